"""The end-of-search report of a study: the optimization history and parameter importance plots
(Optuna's matplotlib backend) and a markdown table of the trials."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna


def _save(plot, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            axes = plot()
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few complete trials for this plot
            return None
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def trials_markdown(study: optuna.Study) -> str:
    """A markdown table of every trial: number, state, value, the epoch a pruned trial stopped at, params."""
    from components.tuning.study import PRUNED_EPOCH_ATTR

    names = sorted({k for t in study.trials for k in t.params})
    lines = [
        "| trial | state | best val/acc | stopped at epoch | " + " | ".join(names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for t in study.trials:
        value = "-" if t.value is None else f"{t.value:.4f}"
        stopped = str(t.user_attrs.get(PRUNED_EPOCH_ATTR, "-"))
        shown = [
            f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-")) for n in names
        ]
        lines.append(f"| {t.number} | {t.state.name} | {value} | {stopped} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def study_report(study: optuna.Study, out_dir: str | Path) -> tuple[list[Path], str]:
    """Write the plots into `out_dir`; returns (files written, markdown summary)."""
    from optuna.visualization import matplotlib as plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _save(lambda: plots.plot_optimization_history(study), out / "optimization_history.png"),
        _save(lambda: plots.plot_param_importances(study), out / "param_importances.png"),
    ]
    table = trials_markdown(study)
    (out / "trials.md").write_text(table + "\n")
    written = [f for f in files if f is not None] + [out / "trials.md"]
    try:
        best = f"best trial {study.best_trial.number}: val/acc {study.best_value:.4f} with {study.best_params}"
    except ValueError:
        best = "no trial completed"
    return written, f"# Study {study.study_name}\n\n{best}\n\n{table}"
