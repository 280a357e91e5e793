"""``slimguard distill``: train a smaller student from a teacher and save it as an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from slimguard.cli.common import Commands, Session, check_out_dir, print_table, resolve_data

commands = Commands()
register = commands.register  # the CLI calls register(app)


@commands.add(distributed=True)
def distill(
    s: Session,
    teacher: str = typer.Argument(..., help="Teacher: zoo:NAME, a .slim file, minilm, hf:DIR, python:F.py:fn."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the student is saved in it as model.slim."),
    student: str | None = typer.Option(None, help="Student model source (default: built from the teacher)."),
    width: float | None = typer.Option(None, help="Student = teacher's zoo architecture with widths x this."),
    keep_layers: list[int] | None = typer.Option(None, "--keep-layer",
                                                 help="Student = teacher keeping this layer (index, negative from the "
                                                      "end); repeat for several, e.g. --keep-layer 0 --keep-layer 2."),
    data: str | None = typer.Option(None, help="Data set (default: the teacher's own)."),
    temperature: float = typer.Option(4.0, help="Softmax temperature of soft targets (> 0)."),
    alpha: float = typer.Option(0.9, help="Weight of the teacher term; 1 - alpha goes to the labels."),
    targets: str = typer.Option("soft", help="soft (KL at temperature) or hard (teacher argmax)."),
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    batch_size: int = typer.Option(64, help="Examples per step."),
    max_length: int = typer.Option(128, help="Token limit for text data."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = typer.Option("auto", help="Where to train: auto (this rank's GPU under torchrun with NCCL, "
                                            "else where the model is), cpu, cuda or cuda:N."),
) -> None:
    """Distill TEACHER into a smaller student (given, narrower, or with fewer layers); save it as OUT/model.slim."""
    import copy

    from slimguard.artifact import save
    from slimguard.core.errors import ConfigError
    from slimguard.distill import DistillConfig, drop_layers_, width_student
    from slimguard.distill import distill as run_distill
    from slimguard.evaluate import evaluate

    chosen = [x for x in (student, width, keep_layers or None) if x is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --student, --width or --keep-layer")
    check_out_dir(out, "model.slim")  # before any work
    cfg = DistillConfig.from_fields(
        {"temperature": temperature, "alpha": alpha, "targets": targets, "max_length": max_length,
         "finetune": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "device": device}},
        where="distill")
    t = s.load(teacher)
    bundle, name = resolve_data(t, data, text_default="docs-text", seed=seed, role="teacher")
    if student is not None:
        st = s.load(student)
    elif width is not None:
        st = width_student(t, width, seed=seed)
    else:
        st = drop_layers_(copy.deepcopy(t), list(keep_layers or []))
    history = run_distill(t, st, bundle, cfg, progress=s.show)
    if not s.main:  # under torchrun rank 0 evaluates and writes the student
        return
    reference = t if bundle.task == "embedding" else None
    before = evaluate(t, bundle.test, reference=reference, measure_latency=False, measure_size=False)
    after = evaluate(st, bundle.test, reference=reference, measure_latency=False, measure_size=False)
    path = save(st, out / "model.slim", metrics=after)
    metric = "cosine_mean" if bundle.task == "embedding" else "accuracy"
    result = {"teacher": {metric: before.get(metric), "params": before["params"]},
              "student": {metric: after.get(metric), "params": after["params"]},
              "epochs_run": len(history["epochs"]), "artifact": str(path), "size_bytes": path.stat().st_size}

    def show() -> None:
        print_table(f"distill {teacher} on {name} (test split)", ["", metric, "params"],
                    [("teacher", before.get(metric), before["params"]),
                     ("student", after.get(metric), after["params"])])

    s.emit(result, show)
    s.wrote(path)
