"""The small-scale study of Tables 2, 4 and 5 on the shapes world: Std. RL, RankE and decoder-only by
default (also SFT, RankE without each decoder term, and the rank temperature tau), every arm at the same
budget (the default run's 10 rounds of 3 steps; SFT the same number of steps on the real pairs), each over
seeds; then the mean and standard error over seeds of every held-out metric at every evaluated round, as a
table and as curves with +- 1 SE bands, and RankE minus Std. RL seed by seed with its 95% t-interval.

    python study.py                                   # the three arms x 5 seeds, into out/study (the default's 8 prompts)
    python study.py config/shapes_all.py              # ... on the world's 732 training prompts (the studies of docs/)
    python study.py --arms=ranke,std_rl --seeds=1,2   # a part; runs already complete are reused
    python study.py config/janus_shapes.py            # the same study on another world or backbone

Each run is `ranke.py` with the arm's switches and `--seed=S` (the seed of every draw: rollouts, chunks,
real images, the discriminator's init), in out/study/<arm>_s<S>; an interrupted study resumes where it
stopped (ranke.py resumes each run; a finished one only reports). Seed 0 is the default run's, used to
explore the world; the reported studies ran seeds 1-5 on the shipped base (docs/shapes_world.md) and
1-7 on the first (docs/history_shapes_base_3000.md).
"""
import json
import math
import os
import sys

import ranke
from checkpoint import atomic_write
from configurator import configure
from figures import paired_table, study_curves, study_table

# -- config --
study_dir = "out/study"
arms = "std_rl,ranke,decoder_only"  # also: sft, no_rank_gan, no_bp, no_rec, no_cons, tau_inf, tau_1, tau_0.01, released(_right)
seeds = "1,2,3,4,5"
ARMS = {  # arm -> the switches that make it (the default run is RankE with tau = 0.1)
    "sft": ["--mode=sft"], "std_rl": ["--mode=policy_only"], "decoder_only": ["--mode=decoder_only"], "ranke": [],
    "no_rank_gan": ["--lambda_gan=0"], "no_bp": ["--lambda_bp=0"], "no_rec": ["--lambda_rec=0"],
    "no_cons": ["--lambda_cons=0"], "tau_inf": ["--tau=inf"], "tau_1": ["--tau=1.0"], "tau_0.01": ["--tau=0.01"],
    # the authors' release at the same budget (30 rounds of 1 + 1 steps), with the world GPT's left padding, and as released
    "released": ["config/released_shapes.py", "--caption_padding=left"], "released_right": ["config/released_shapes.py"]}
METRICS = ("reward", "CLIP", "FID", "FD", "FD_CLIP", "FD_content", "GenEval", "code_KL", "code_entropy", "FID_rec", "FD_rec",
           "rec_L1", "redraw_L1")
PAIRED = ("ranke", "std_rl")  # the paired comparison: the first arm minus the second, seed by seed


def mean_se(xs):
    """Mean and standard error of the mean (sample std / sqrt n; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else 0.0)


def read_run(out_dir):
    """A run's held-out metrics by round (its in-loop evaluations), with each round's training reward."""
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = {r["round"]: dict(r["eval"]) for r in records if "eval" in r}
    rewards = {r["round"]: r["reward"] for r in records if "reward" in r}
    for rnd, m in evals.items():
        if rnd in rewards:
            m["reward"] = rewards[rnd]
    return evals


def summarise(runs):
    """runs: {arm: [evals of each seed]} -> {arm: {round: {metric: (mean, se, n)}}} over the seeds that
    have the round."""
    out = {}
    for arm, seed_evals in runs.items():
        rounds = sorted({r for e in seed_evals for r in e})
        out[arm] = {r: {k: (*mean_se(v), len(v)) for k in METRICS
                        if (v := [e[r][k] for e in seed_evals if r in e and k in e[r]])} for r in rounds}
    return out


def paired(runs, a, b):
    """{metric: (mean, se, lo, hi, n)} of arm a minus arm b at their common last round, paired by seed (the
    same seed draws the same first rollouts in both), with the 95% t-interval on n - 1 degrees of freedom."""
    from scipy.stats import t
    out = {}
    last = min(max(e) for e in runs[a] + runs[b])
    for k in METRICS:
        d = [x[last][k] - y[last][k] for x, y in zip(runs[a], runs[b]) if k in x.get(last, {}) and k in y.get(last, {})]
        if len(d) > 1:
            m, se = mean_se(d)
            h = t.ppf(0.975, len(d) - 1) * se
            out[k] = (m, se, m - h, m + h, len(d))
    return last, out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = {"study_dir": study_dir, "arms": arms, "seeds": seeds}
    ours = [a for a in argv if a.startswith(tuple(f"--{k}=" for k in cfg))]
    configure(cfg, ours)
    passed = [a for a in argv if a not in ours]  # config files and overrides for every run
    unknown = [a for a in cfg["arms"].split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    runs = {}
    for arm in cfg["arms"].split(","):
        runs[arm] = []
        for seed in (int(s) for s in cfg["seeds"].split(",")):
            out = os.path.join(cfg["study_dir"], f"{arm}_s{seed}")
            ranke.main([*passed, *ARMS[arm], f"--seed={seed}", f"--out_dir={out}"])  # resumes; a finished run returns
            runs[arm].append(read_run(out))
    summary = summarise(runs)
    text = study_table(summary, METRICS)
    if all(arm in runs and len(runs[arm]) > 1 for arm in PAIRED):
        text += "\n\n" + paired_table(*PAIRED, *paired(runs, *PAIRED))
    atomic_write(os.path.join(cfg["study_dir"], "study_table.md"), text + "\n")
    atomic_write(os.path.join(cfg["study_dir"], "study.json"), json.dumps(summary, indent=1))
    study_curves(summary, os.path.join(cfg["study_dir"], "study_curves.png"), METRICS)
    print(text)
    return summary


if __name__ == "__main__":
    main()
