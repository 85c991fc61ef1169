"""The batcher forms a batch when the model is free, keeps each caller's order, and
survives failing batches and callers that gave up."""

import asyncio

import pytest

from serving.batcher import Batcher


class Model:
    """Doubles its inputs; each batch takes ``seconds``; records the batches it ran."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("the model failed")
        return [2 * i for i in items]


def test_inputs_that_arrive_while_the_model_runs_form_the_next_batch():
    async def scenario():
        model = Model(seconds=0.1)
        batcher = Batcher(model, max_batch_size=32, wait_s=0.0)
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.02)  # the model is busy with [0] now
        later = [asyncio.create_task(batcher.submit([i])) for i in range(1, 11)]
        results = await asyncio.gather(first, *later)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0], list(range(1, 11))]
    assert results == [[2 * i] for i in range(11)]


def test_a_request_of_many_inputs_is_one_batch_in_its_order_and_split_at_the_maximum():
    async def scenario():
        model = Model(seconds=0.0)
        batcher = Batcher(model, max_batch_size=32, wait_s=0.0)
        return model.batches, await batcher.submit(list(range(40)))

    batches, results = asyncio.run(scenario())
    assert batches == [list(range(32)), list(range(32, 40))]
    assert results == [2 * i for i in range(40)]


def test_a_failing_batch_fails_its_callers_only_and_the_batcher_goes_on():
    async def scenario():
        batcher = Batcher(Model(seconds=0.0, fail_on=13), max_batch_size=4, wait_s=0.0)
        with pytest.raises(ValueError, match="the model failed"):
            await batcher.submit([13])
        return await batcher.submit([1, 2])

    assert asyncio.run(scenario()) == [2, 4]


def test_a_caller_that_gave_up_is_not_computed():
    async def scenario():
        model = Model(seconds=0.1)
        batcher = Batcher(model, max_batch_size=32, wait_s=0.0)
        busy = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.02)
        impatient = asyncio.create_task(batcher.submit([99]))
        patient = asyncio.create_task(batcher.submit([5]))
        await asyncio.sleep(0.01)
        impatient.cancel()
        await asyncio.gather(busy, patient)
        return model.batches

    assert asyncio.run(scenario()) == [[0], [5]]


def test_a_lone_input_waits_briefly_for_company():
    async def scenario():
        model = Model(seconds=0.0)
        batcher = Batcher(model, max_batch_size=32, wait_s=0.05)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher.submit([2]))
        return model.batches

    assert asyncio.run(scenario()) == [[1, 2]]


def test_a_busy_model_takes_what_queued_at_once_and_only_an_idle_one_waits():
    async def scenario():
        model = Model(seconds=0.1)
        batcher = Batcher(model, max_batch_size=32, wait_s=1.0)
        first = asyncio.create_task(batcher.submit([0]))  # idle: waits 1 s, runs 1.0-1.1
        await asyncio.sleep(1.05)
        second = asyncio.create_task(batcher.submit([1]))  # queued while [0] runs
        await asyncio.sleep(0.35)
        # had [1] waited another second for company, [2] would have joined it
        await asyncio.gather(first, second, batcher.submit([2]))
        return model.batches

    assert asyncio.run(scenario()) == [[0], [1], [2]]
