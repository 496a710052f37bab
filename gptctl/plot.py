"""Loss curves: a PNG through matplotlib (optional extra), or a character plot for the terminal.

Pure Python apart from matplotlib, so `gptctl runs plot` without -o stays as light as `runs list`.
"""

from dataclasses import dataclass

MARKERS = "•x+o*#%@"


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), x ascending


def terminal_plot(series: list[Series], title: str, x_label: str, width: int = 72, height: int = 18) -> str:
    """Scatter every series onto a character grid, one marker each, with y and x ranges on the axes."""
    points = [p for s in series for p in s.points]
    if not points:
        return f"{title}: nothing to plot yet"
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for marker, s in zip(MARKERS * 8, series):
        for x, y in s.points:
            col = round((x - x0) / (x1 - x0) * (width - 1)) if x1 > x0 else 0
            row = round((y1 - y) / (y1 - y0) * (height - 1)) if y1 > y0 else height // 2
            grid[row][col] = marker
    label_width = max(len(f"{y0:.3f}"), len(f"{y1:.3f}"))
    lines = [title]
    for i, row in enumerate(grid):
        axis = f"{y1:.3f}" if i == 0 else f"{y0:.3f}" if i == height - 1 else ""
        lines.append(f"{axis:>{label_width}} │{''.join(row)}")
    lines.append(" " * label_width + " └" + "─" * width)
    left, right = f"{x0:,.0f}", f"{x1:,.0f}"
    lines.append(" " * (label_width + 2) + left + x_label.center(width - len(left) - len(right)) + right)
    lines.append("  ".join(f"{m} {s.label}" for m, s in zip(MARKERS * 8, series)))
    return "\n".join(lines)


def png_plot(panels: dict[str, list[Series]], x_label: str, path: str) -> None:
    """One panel per metric, runs overlaid; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (metric, series) in zip(axes[:, 0], panels.items()):
        for s in series:
            if s.points:
                ax.plot([x for x, _ in s.points], [y for _, y in s.points], label=s.label,
                        marker="o" if len(s.points) < 30 else None, markersize=3)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(x_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
