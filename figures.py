"""Tables, curves and figures of evaluated rounds, for eval.py (a run's rounds, runs side by side) and
study.py (arms over seeds, mean ± SE). Every picture is written via a temporary name and a rename."""
import os

from common import read_prompts


def table(results):
    """Markdown: a row per (run, round), a column per metric."""
    keys = sorted({k for r in results.values() for m in r.values() for k in m})
    lines = ["| run | round | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, r in results.items():
        for rnd, m in sorted(r.items()):
            lines.append(f"| {name} | {rnd} | " + " | ".join(f"{m[k]:.4g}" if k in m else "" for k in keys) + " |")
    return "\n".join(lines)


def curves(results, path, reward_by_round):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["FID", "FD", "FD_CLIP", "FD_content", "FID_rec", "FD_rec", "redraw_L1", "CLIP", "GenEval", "code_KL",
            "code_entropy", "reward"]
    keys = [k for k in keys if any(k in m for r in results.values() for m in r.values()) or k == "reward"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, k in zip(axes, keys):
        for name, r in results.items():
            pts = sorted(reward_by_round[name].items()) if k == "reward" else [(x, m[k]) for x, m in sorted(r.items()) if k in m]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=os.path.basename(name.rstrip("/")))
        ax.set_title(k)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def before_after(c, columns, path, heading=""):
    """One figure a person reads at a glance: the first `figure_prompts` eval prompts written beside two
    samples of each (the same seeds in every column) from each column's images, pixels enlarged as they
    are (nearest), the column's headline metrics above it. columns: [(title, image folder, metrics)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    prompts = read_prompts(c.eval_prompts)[:c.figure_prompts]
    k, n = min(2, c.eval_n_per_prompt), len(columns)
    fig, axes = plt.subplots(len(prompts), 1 + n * k, figsize=(3.2 + n * k * 1.6, 1.6 * len(prompts)), squeeze=False,
                             gridspec_kw={"width_ratios": [2] + [1] * n * k})
    for i, prompt in enumerate(prompts):
        axes[i, 0].text(1.0, 0.5, prompt, ha="right", va="center", wrap=True, fontsize=9)
        for j, (title, folder, m) in enumerate(columns):
            for s in range(k):
                ax = axes[i, 1 + j * k + s]
                ax.imshow(Image.open(os.path.join(folder, f"{i * c.eval_n_per_prompt + s:06d}.png")), interpolation="nearest")
                if i == 0 and s == 0:
                    shown = [f"{key} {m[key]:.1f}" for key in ("CLIP", "FID", "FD", "FD_CLIP") if key in m]
                    shown += [f"GenEval {m['GenEval']:.2f}"] if "GenEval" in m else []
                    ax.set_title(f"{title}\n" + ", ".join(shown), fontsize=9, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    if heading:
        fig.suptitle(heading, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def paired_table(a, b, last, diffs):
    """Markdown: arm a minus arm b at round `last`, metric by metric, paired by seed."""
    lines = [f"{a} - {b} at round {last}, paired by seed (mean ± SE, 95% t-interval):", "",
             "| metric | difference | 95% interval | n |", "|---|---|---|---|"]
    lines += [f"| {k} | {m:.4g} ± {se:.2g} | [{lo:.4g}, {hi:.4g}] | {n} |" for k, (m, se, lo, hi, n) in diffs.items()]
    return "\n".join(lines)


def study_table(summary, metrics):
    """Markdown: an arm a row, each of `metrics` at the arm's last round as mean +- SE (n seeds)."""
    keys = [k for k in metrics if any(k in s[max(s)] for s in summary.values())]
    lines = ["| arm | round | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm, s in summary.items():
        last = max(s)
        cells = [f"{s[last][k][0]:.4g} ± {s[last][k][1]:.2g}" if k in s[last] else "" for k in keys]
        lines.append(f"| {arm} | {last} (n={max(v[2] for v in s[last].values())}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_curves(summary, path, metrics):
    """An arm's mean over seeds against the round, ± SE shaded, a panel a metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in metrics if any(k in m for s in summary.values() for m in s.values())]
    width = 3.2 * len(keys) + 1.4  # 1.4 inches on the right for the legend
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 3.0), squeeze=False)
    colour = {arm: plt.cm.tab20(i % 20) for i, arm in enumerate(summary)}  # one colour an arm in every panel
    for ax, k in zip(axes[0], keys):
        for arm, s in summary.items():
            pts = [(r, *m[k][:2]) for r, m in sorted(s.items()) if k in m]
            if pts:
                x, mu, se = zip(*pts)
                ax.plot(x, mu, marker="o", color=colour[arm])
                ax.fill_between(x, [a - b for a, b in zip(mu, se)], [a + b for a, b in zip(mu, se)],
                                color=colour[arm], alpha=0.15)
        ax.set_title(k)
        ax.set_xlabel("round")
    handles = [plt.Line2D([], [], color=colour[arm], marker="o") for arm in summary]
    fig.legend(handles, list(summary), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / width, 1))
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
