"""A picture of an export: per-column activation norms, norm histograms and token lengths.

    python -m actlightning.report OUTPUT_DIR [--out report.png]

Streams the shards one row group and one column at a time, so memory stays small whatever the size
of the export. Massive activations (tokens whose norm is far above the rest) show as a max line far
above the mean, and as a long right tail in the histograms. Needs matplotlib (``pip install
actlightning[report]``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actlightning.read.reader import column_vectors, open_export, stored_dtype, to_torch

# Norms kept per column for histograms and quantiles (every k-th token once more arrive).
_SAMPLE = 200_000
# A token is an outlier when its norm is this many times the column's median norm.
OUTLIER_FACTOR = 10.0


@dataclass
class NormStats:
    """Running statistics of one vector column's per-token L2 norms."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    maximum: float = 0.0
    sample: list[np.ndarray] = field(default_factory=list)
    sampled: int = 0

    def add(self, norms: np.ndarray) -> None:
        self.count += len(norms)
        self.total += float(norms.sum())
        self.total_sq += float((norms.astype(np.float64) ** 2).sum())
        self.maximum = max(self.maximum, float(norms.max()) if len(norms) else 0.0)
        stride = max(1, self.count // _SAMPLE)
        self.sample.append(norms[::stride])
        self.sampled += len(self.sample[-1])

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.total_sq / max(self.count, 1) - self.mean**2, 0.0)))

    def norms(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros(0)


def collect(path: str | Path) -> tuple[dict[str, NormStats], np.ndarray, object]:
    """Norm statistics per vector column and the exported length of each sequence."""
    export = open_export(path)
    stats = {name: NormStats() for name in export.vector_columns}
    lengths: list[np.ndarray] = []
    token_examples: list[np.ndarray] = []
    for name in export.names:
        parquet = export.parquet_file(name)
        for group in range(parquet.metadata.num_row_groups):
            for name in export.vector_columns:
                table = parquet.read_row_group(group, columns=[name])
                vectors, _ = column_vectors(table.column(name))
                if not len(vectors):
                    continue
                values = to_torch(vectors, stored_dtype(table.schema.field(name))).float()
                stats[name].add(values.norm(dim=1).numpy())
            if export.layout == "sequence":
                ids = parquet.read_row_group(group, columns=["input_ids"]).column(0).combine_chunks()
                lengths.append(np.diff(ids.offsets.to_numpy()))
            else:
                token_examples.append(parquet.read_row_group(group, columns=["example_id"]).column(0).to_numpy())
    if export.layout == "token" and token_examples:
        _, counts = np.unique(np.concatenate(token_examples), return_counts=True)
        lengths = [counts]
    return stats, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64), export


def summary(stats: dict[str, NormStats], lengths: np.ndarray, export) -> str:
    lines = [
        f"{export.path}: {export.rows:,} rows, {export.tokens:,} tokens, layout {export.layout}, "
        f"{len(export.files)} shards; sequence length mean {lengths.mean() if len(lengths) else 0:.1f}, "
        f"max {lengths.max() if len(lengths) else 0}",
        f"{'column':<34} {'mean norm':>10} {'std':>10} {'max':>12} {'outliers':>9}",
    ]
    for name, column in stats.items():
        norms = column.norms()
        median = float(np.median(norms)) if len(norms) else 0.0
        outliers = int((norms > OUTLIER_FACTOR * median).sum()) if median > 0 else 0
        lines.append(f"{name:<34} {column.mean:>10.3f} {column.std:>10.3f} {column.maximum:>12.3f} {outliers:>9}")
    lines.append(f"outliers: sampled tokens with norm > {OUTLIER_FACTOR:g}x the column's median norm")
    return "\n".join(lines)


def render(stats: dict[str, NormStats], lengths: np.ndarray, export, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    x = np.arange(len(names))
    means = np.array([stats[n].mean for n in names])
    stds = np.array([stats[n].std for n in names])
    ax.plot(x, means, "o-", label="mean norm")
    ax.fill_between(x, np.maximum(means - stds, 1e-6), means + stds, alpha=0.3, label="+-1 std")
    ax.plot(x, [stats[n].maximum for n in names], "r^--", label="max norm")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_title("Per-token L2 norm by column (log scale)")
    ax.legend()
    # One small histogram per shown column, each on its own x range: norms differ by orders of
    # magnitude between layers, and a shared axis squeezes the small ones into a single bar.
    shown = names if len(names) <= 4 else [names[i] for i in np.linspace(0, len(names) - 1, 4).round().astype(int)]
    grid = axes[0][1].get_subplotspec().subgridspec(2, 2, hspace=0.55, wspace=0.3)
    axes[0][1].remove()
    for slot, name in enumerate(shown):
        ax = figure.add_subplot(grid[slot // 2, slot % 2])
        norms = stats[name].norms()
        if len(norms):
            ax.hist(norms, bins=60, log=True, color=f"C{slot}")
            ax.axvline(np.median(norms), color="k", lw=0.8, ls="--")
        ax.set_title(f"{name}: L2 norm (dashed: median)", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[1][0]
    ax.hist(lengths, bins=min(60, max(len(np.unique(lengths)), 1)))
    ax.set_title("Exported tokens per sequence")
    ax.set_xlabel("tokens")
    ax = axes[1][1]
    ax.axis("off")
    ax.text(0, 1, summary(stats, lengths, export), family="monospace", fontsize=7, va="top")
    figure.suptitle(f"actlightning export: {export.manifest['settings']['model']['checkpoint']}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="actlightning report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, help="an export folder (holding manifest.json)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: OUTPUT_DIR/report.png)")
    args = parser.parse_args(argv)
    stats, lengths, export = collect(args.output_dir)
    out = render(stats, lengths, export, args.out or args.output_dir / "report.png")
    print(summary(stats, lengths, export))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
