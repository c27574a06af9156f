r"""DT and AT on generated MuJoCo sets, 3 seeds each, and AT's n-ablation: the continuous-control
results table at the scale this machine runs (issue 15).

  ringrl-collect mujoco --env Hopper-v5 --steps 200000 --dataset-steps 200000 --out data
  ringrl-collect mujoco --env Walker2d-v5 --steps 200000 --dataset-steps 200000 --out data
  ringrl-collect mujoco --env HalfCheetah-v5 --steps 200000 --dataset-steps 200000 --out data \
      --version 1                              # read with suite.data_version=1
  ringrl-d4rl                                  # every cell below, then the table and the plot
  ringrl-train --config configs/d4rl_suite.py:set=hopper-medium-replay,agent=at,n=4,seed=1

experiments/d4rl_suite.py trains and evaluates `cell(config, set, agent, n, seed)` for every set
and seed in `config.suite` (DT; AT with `suite.at_n` trajectories) and every n of
`suite.ablation_ns` on each of `suite.ablation_sets` (AT), reusing cells that have an eval.json.

What every cell shares, so that DT and AT differ only in what they read:
- the backbone of Chen et al.'s DT (configs/dt_d4rl.py: 128 wide, 3 layers, 1 head, relu,
  dropout 0.1, LayerNorm on the embeddings, states normalised, returns-to-go / 1000);
- the schedule: `suite.steps` AdamW steps (lr `suite.lr`, 10% warmup, cosine decay; Chen et al.
  run 100k steps at 1e-4, 8-14 h per run on this CPU);
- the data per step: DT the paper's 64 windows of K = 20 steps (1280 steps, 3840 tokens); AT
  `suite.trajectories_per_step` / n contexts of n trajectories of `suite.cap` steps, one token
  each: 8 x 256 = 2048 steps and tokens for every n (an AT step costs ~1.6x a DT step here).

`suite.bc_sets` adds Chen et al.'s percentile behaviour cloning beside DT (agent "bc"): DT's cell
with the return-to-go input zeroed, trained on the best-return episodes holding
`suite.bc_fraction` of the steps.

How they differ:
- DT reads a window of K = 20 steps (3 tokens each) and is evaluated on whole 1000-step episodes
  from the paper's target return (the faithful protocol), and again truncated at the cap;
- AT reads n return-sorted trajectories, one token per step, each cut at `suite.cap` steps (whole
  1000-step slots would make n = 8 an 8000-token context: ~16 s per step here), sharded over the
  ring of every device (zigzag layout). It is evaluated on episodes of `suite.cap` steps, n
  attempts in a row with the earlier ones in context, from the paper's target scaled to the cap
  (target * cap / 1000). Its scores are normalised with references at the same cap (the random
  and expert sets' returns over their first `cap` steps), and compared with DT's at the cap.
"""

import ml_collections

from ringrl.configs import at_d4rl, common, dt_d4rl

AGENTS = ("dt", "at", "bc")


def data_path(folder: str, name: str, version: int = 0) -> str:
    """Where `ringrl-collect mujoco --out folder --version V` writes set `name`
    ("hopper-medium-replay"): folder/hopper-medium-replay-ringrl-vV.hdf5."""
    return f"{folder.rstrip('/')}/{name}-ringrl-v{version}.hdf5"


def eval_target(suite, name: str, agent: str, target: str) -> float:
    """The evaluation target return of `agent` on set `name` for `target` ("high", "low", "max"
    or a number): the paper's value for the task (configs/dt_d4rl.py) for DT's whole episodes,
    scaled to the cap (target * cap / 1000) for AT's episodes of `suite.cap` steps; "max" the
    set's highest episode return, over whole episodes for DT and cut at the cap for AT."""
    path = data_path(suite.data, name, suite.data_version)
    if target == dt_d4rl.DATA_TARGET:
        return dt_d4rl.data_max_return(path, None if agent == "dt" else suite.cap)
    value = dt_d4rl.target_return("", path, target)
    return value if agent == "dt" else value * suite.cap / 1000.0


def cell(
    config: ml_collections.ConfigDict, name: str, agent: str, n: int, seed: int
) -> ml_collections.ConfigDict:
    """The run of one table cell: `agent` on set `name`: "dt", "at" with n trajectories, or
    "bc", Chen et al.'s percentile behaviour cloning (DT's transformer with returns-to-go zeroed,
    trained on the best `suite.bc_fraction` of the set's steps by episode return)."""
    if agent not in AGENTS:
        raise ValueError(f"suite agent must be one of {AGENTS}, got {agent!r}")
    s = config.suite
    path = data_path(s.data, name, s.data_version)
    smoke = ",smoke" if s.smoke else ""
    if agent in ("dt", "bc"):
        bc = f",bc={s.bc_fraction}" if agent == "bc" else ""
        out = dt_d4rl.get_config(f"path={path},target={s.target}{bc}{smoke}")
        out.name = (
            f"dt_{name}_seed{seed}"
            if agent == "dt"
            else f"bc{round(100 * s.bc_fraction)}_{name}_seed{seed}"
        )
        per_step = s.dt_batch
    else:
        if s.trajectories_per_step % n:
            raise ValueError(
                f"suite.trajectories_per_step={s.trajectories_per_step} is not a multiple of "
                f"n={n}; pick ns that divide it"
            )
        out = at_d4rl.get_config(f"path={path},n={n},target={s.target}{smoke}")
        out.name = f"at_{name}_n{n}_seed{seed}"
        per_step = s.trajectories_per_step // n
        # DT's backbone and regularisation (at_d4rl.py keeps its own otherwise).
        dt_model = dt_d4rl.get_config(smoke[1:]).model
        for key in ("embed_dim", "num_layers", "num_heads", "mlp_ratio", "dropout", "embed_norm"):
            out.model[key] = dt_model[key]
        for key in ("activation", "return_scale"):
            out.model[key] = dt_model[key]
        out.model.reward_scale = s.reward_scale
        out.model.remat = "none"  # contexts of at most 8 x cap tokens fit without it
        out.model.layout = "zigzag"  # n * cap divides by 2 x the ring for every n here
        out.mesh = (("data", 1), ("seq", -1))  # the ring spans every device
        out.data.horizon = s.cap  # slots of `cap` steps (longer episodes cut there)
        out.eval.max_steps = s.cap  # ... so evaluation episodes end there too
        out.eval.target_return = eval_target(s, name, "at", s.target)
    out.seed = seed
    out.batch_size = per_step
    out.num_steps = s.steps
    out.optim.lr = s.lr
    out.optim.warmup_steps = max(1, s.steps // 10)
    out.eval.every = 0  # once, at the end
    out.eval.seed = 100 + 1000 * seed  # evaluation environments differ per seed
    out.eval.num_envs = s.episodes
    # Four checkpoints per cell: a killed cell (45 min at 7200 steps) resumes from its last quarter.
    out.checkpoint_every = max(1, s.steps // 4)
    out.log_every = max(1, s.steps // 20)
    out.suite = s.to_dict()
    out.lock()
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: set, agent ("dt", "at" or "bc"), n, seed (one cell, for ringrl-train), data (folder
    of the sets), version (of the sets: ringrl-collect mujoco --version), smoke."""
    arg = common.parse_arg(
        arg,
        set="hopper-medium-replay",
        agent="at",
        n=4,
        seed=0,
        data="data",
        version=0,
        smoke=False,
    )
    config = ml_collections.ConfigDict()
    config.suite = dict(
        data=arg.data,  # folder ringrl-collect mujoco wrote to
        # Which collection's sets (ringrl-collect mujoco --version): 0 the README's tables, 1 the
        # sets with medium and expert picked on sampled-action returns (agents/sac_collect.py).
        data_version=arg.version,
        # DT only, e.g. ("hopper-medium", "walker2d-medium") (not run for the README table).
        dt_sets=(),
        # %BC cells (agent "bc") on these sets, e.g. ("hopper-medium",): Chen et al.'s baseline,
        # DT's transformer without returns-to-go, trained on the best `bc_fraction` of the steps.
        bc_sets=(),
        bc_fraction=0.1,
        # Start-state noise scales (gym's reset_noise_scale; Hopper and Walker2d use 5e-3, as in
        # the data) at which each DT and %BC cell of `bc_sets` is evaluated again on its test
        # episodes at its chosen target: does a score rest on near-identical starts? () = skip.
        start_noise=(),
        # Training windows per band of experiments/d4rl_suite.py's `fit_probe` (what DT and %BC
        # fit, and how far DT's actions follow its return-to-go) on sets with both; 0 = skip.
        probe_windows=1024,
        sets=(
            "hopper-medium-replay",
            "hopper-medium-expert",
            "walker2d-medium-replay",
            "walker2d-medium-expert",
        ),
        seeds=(0, 1, 2),
        at_n=4,  # AT's trajectories in context in the DT/AT table
        # AT's n-ablation on each of these (n = at_n shared with the table).
        ablation_sets=("hopper-medium-replay", "hopper-medium-expert"),
        ablation_ns=(1, 2, 4, 8),  # AT cells of the n-ablation (n = at_n is shared)
        cap=256,  # AT: steps per trajectory slot and per evaluation episode
        trajectories_per_step=8,  # AT: contexts per step = this / n (8 x 256 = 2048 tokens)
        dt_batch=64,  # DT: windows of K = 20 steps per train step (3840 tokens, as the paper)
        steps=800,  # train steps of every cell
        lr=6e-4,  # peak AdamW learning rate of every cell
        reward_scale=0.3,  # AT's reward input scale (MuJoCo rewards are ~1-5 per step)
        # The evaluation target return: "high" or "low" (the paper's per task), "max" (the set's
        # highest episode return) or a number.
        target="high",
        # Candidate targets, e.g. ("high", "low", "max"): each cell is evaluated at every one on
        # validation episodes (env seeds = the test seed + valid_seed), and each (set, agent, n)
        # is reported on the test episodes at the candidate whose validation mean over seeds is
        # best. () = `target` only, no validation episodes.
        targets=(),
        valid_seed=500,
        # Evaluation environments per cell, rounded up to whole shards of the data mesh: AT 10,
        # DT 16 (its 8-way data mesh).
        episodes=10,
        smoke=False,  # tiny models and data sizes (tests)
    )
    if arg.smoke:  # tests: a few CPU seconds per cell (the agents' own smoke models)
        config.suite.update(
            smoke=True,
            steps=2,
            cap=16,
            trajectories_per_step=4,
            dt_batch=8,
            dt_sets=(),
            bc_sets=(),
            probe_windows=16,
            ablation_sets=("hopper-medium-replay",),
            episodes=2,
            at_n=2,
            ablation_ns=(1, 2),
            seeds=(0,),
            sets=("hopper-medium-replay",),
        )
    return cell(config, arg.set, arg.agent, arg.n, arg.seed)
