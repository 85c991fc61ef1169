"""What ``protege init`` prints: the pair, the calibration sample, and the escalation each
target agreement costs per scorer (classification and generative tasks)."""

from __future__ import annotations


def print_generate_init_report(report: dict) -> None:
    figures = report["figures"]
    print(f"generative task {report['task']} (distillation: {report['distillation']})")
    print(f"  teacher {report['teacher']}")
    print(f"  seed student {report['student']} (current in {report['registry']})")
    print(
        f"  on {figures['traffic_prompts']} traffic prompts: the student agrees with the "
        f"teacher (ROUGE-L >= the cut) on {figures['agreement']:.1%}, ROUGE-L "
        f"{figures['student_teacher_rouge_l']:.3f}"
    )
    if "gold_prompts" in figures:
        print(
            f"  ROUGE-L against gold on {figures['gold_prompts']} prompts: teacher "
            f"{figures['teacher_gold_rouge_l']:.3f}, student {figures['student_gold_rouge_l']:.3f}"
        )
    _print_costs_and_next_steps(report)


def print_init_report(report: dict) -> None:
    figures = report["figures"]
    print(f"task {report['task']}: labels {', '.join(report['labels'])}")
    print(f"  teacher {report['teacher']}")
    print(f"  seed student {report['student']} (current in {report['registry']})")
    line = f"  on {figures['traffic_texts']} traffic texts: student agrees with the teacher on "
    print(line + f"{figures['student_teacher_agreement']:.1%}")
    if "teacher_gold_accuracy" in figures:
        print(
            f"  gold accuracy on {figures['gold_texts']} texts: teacher "
            f"{figures['teacher_gold_accuracy']:.1%}, student {figures['student_gold_accuracy']:.1%}"
        )
    _print_costs_and_next_steps(report)


def _print_costs_and_next_steps(report: dict) -> None:
    """What both kinds print last: the escalation each target costs, the seed's serving
    threshold, and the commands that serve and distil the task."""
    from distill.prepare import format_table

    figures = report["figures"]
    print(
        "\nescalation rate each target agreement with the teacher costs, per scorer "
        "(on the traffic sample):"
    )
    print(format_table(report["escalation_by_target"]))
    print(
        f"\nthe seed serves at threshold {figures['threshold']:.3f} (its default target), "
        f"escalating {figures['escalation_rate']:.1%} of the sample"
    )
    print(f"serve it:   protege serve --config {report['serve_config']}")
    print(f"distil it:  protege distill run --config {report['distill_config']}")
