import pytest
import torch
from tiny_lm import CHAT_TEMPLATE, build_tiny_lm, build_tokenizer

from serving.contracts.generation_records import canonical_prompt
from serving.generate.models import (
    load_language_model,
    load_tokenizer,
    render_chat,
    render_completion,
    same_tokenizer,
)


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", seed=1)


def test_loads_in_eval_mode_with_left_padding_and_a_pad_token(folder):
    lm = load_language_model(folder, device="cpu")
    assert not lm.model.training
    assert lm.device == torch.device("cpu")
    assert lm.model.dtype == torch.float64  # the saved dtype is kept
    assert lm.tokenizer.padding_side == "left"
    # the tokenizer names no pad token: its EOS pads
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|im_end|>"
    assert lm.eos_token_ids == {lm.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert lm.folder == folder


def test_loads_safetensors_only(folder, tmp_path):
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    lm = load_language_model(folder, device="cpu")
    torch.save(lm.model.state_dict(), tmp_path / "pytorch_model.bin")
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(OSError):
        load_language_model(tmp_path, device="cpu")


def test_a_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_language_model(tmp_path)


def test_dtype_on_request(folder):
    assert load_language_model(folder, device="cpu", dtype=torch.float32).model.dtype == (
        torch.float32
    )


def test_chat_renders_through_the_template_with_the_assistant_prompt(folder):
    tokenizer = load_tokenizer(folder)
    ids = render_chat(tokenizer, [{"role": "user", "content": "The cat sat"}])
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>user\nThe cat sat<|im_end|>\n<|im_start|>assistant\n"
    # the template's special tokens are single tokens, not spelled out
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_without_a_template_is_a_clear_error():
    tokenizer = build_tokenizer(template=False)
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="at least one message"):
        render_chat(build_tokenizer(), [])


def test_completion_renders_the_plain_text():
    tokenizer = build_tokenizer()
    ids = render_completion(tokenizer, "Кошка сидит")
    assert tokenizer.decode(ids) == "Кошка сидит"
    with pytest.raises(ValueError, match="empty"):
        render_completion(tokenizer, "")


def test_canonical_prompt_normalises_whitespace_and_unicode_but_no_template():
    messages = [
        {"role": "System", "content": "  Be  brief.\n"},
        {"role": "user", "content": "Cafe\u0301\tau\n\nlait?"},
    ]
    assert canonical_prompt(messages) == "system: Be brief.\nuser: Café au lait?"
    assert canonical_prompt("  one\n two ") == "one two"
    # NFC: the composed and decomposed spellings are one prompt
    assert canonical_prompt("Caf\u00e9") == canonical_prompt("Cafe\u0301")


def test_same_tokenizer_compares_vocabulary_special_tokens_and_template():
    a, b = build_tokenizer(), build_tokenizer()
    assert same_tokenizer(a, b)
    assert not same_tokenizer(a, build_tokenizer(template=False))
    b.add_tokens(["<extra>"])
    assert not same_tokenizer(a, b)
    c = build_tokenizer()
    c.chat_template = CHAT_TEMPLATE.replace("assistant", "bot")
    assert not same_tokenizer(a, c)
