"""Local moves: extend the current Pareto points by one more stage, so good pipelines are combined.

A sampler (TPE or NSGA-II) learns which values pay for each parameter, but with a few dozen trials it may never
draw the combination of two good choices: the warm-start recipe "channel 50% + 12 epochs of fine-tuning" and
"weight sharing after it" are each likely, together they are not. A *local move* tries that combination
directly: it takes a point of the current front and queues its *extensions*, the same parameters plus one
stage the point leaves at ``none``, placed after the point's last step (a pruned and fine-tuned model gets a
quantization step; a model that is only pruned may also get fine-tuning, factorization, ...).

The rules, all deterministic (no randomness, so every seed gives the same moves for the same front):

- **When.** A round runs in the process that just finished a trial, when the study holds no queued trial
  (warm-start recipes and earlier extensions have all run) and: for the first round, every warm-start trial
  has finished (without a warm start: :data:`EVERY` trials); afterwards, :data:`EVERY` more trials have
  finished since the last round.
- **From which points.** The feasible Pareto points of the completed trials on the *validation* objectives
  (:func:`feasible_front`: within the budget, then non-dominated), best first in the first objective.
- **Which extensions.** For each point, every stage after its last step that it leaves at ``none``, in
  pipeline order, and every step that stage allows, in the space's order (so each option once). The new
  step's searched options take the middle of their range (integers rounded half up; ``weight-sharing.bits``
  in [3, 6] gives 5) or the middle of their choices (index ``len // 2``; ``weight-only.bits`` in [4, 8] gives
  8); its per-group choices (``keep_ends``) are off, so the step applies everywhere as the point's steps do.
  Options a warm-start point carries (its recipe's unsearched options) travel with its extensions.
- **Longer training.** After those, for each training step of the point whose length (``...epochs``) the space
  searches among choices, the point with the next longer choice (:func:`longer`; ``finetune.epochs`` 3 gives 6).
- **Never twice.** An extension whose parameters equal those of any trial in the study (finished, running
  or queued) is not queued.
- **Within the budget of trials.** Extensions are taken round-robin over the points (each point's first
  extension, then each point's second, ...) while the study has room: queued trials count against
  ``--trials``, and local moves run at most half of them (:func:`cap`), so the sampler keeps the rest.

Each queued trial carries ``local_move`` (``{"from": TRIAL, "stage", "step"}``, and ``"change"`` for a longer
training, e.g. ``"finetune.epochs 3 -> 6"``) as a user attribute; the study
keeps the rounds (:data:`ATTR`) and ``pareto.json`` reports them with the trial numbers they became
(:func:`stored`). ``--no-local-moves`` queues none.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from slimguard.search.pareto import pareto_indices
from slimguard.search.space import NONE, RECOVERING_STAGES, STAGES, Param, Proxies, SearchSpace
from slimguard.search.warmstart import ATTR as WARM_ATTR
from slimguard.search.warmstart import TRIAL_OPTIONS, _same

ATTR = "local_moves"
"""The study's user attribute: ``{"enabled", "every", "cap", "rounds": [{"after", "queued": [MOVE, ...]}]}``."""
TRIAL_MOVE = "local_move"
"""A queued trial's user attribute: ``{"from": TRIAL, "stage": STAGE, "step": STEP}``."""
EVERY = 4
"""Finished trials between two rounds (and before the first one when there is no warm start)."""
REPEAT = "repeat_of"
"""A trial's user attribute when its pipeline equals that of an earlier measured trial: that trial's number
(its results are replayed, see :mod:`slimguard.search.study`; the earlier trial stands for it on the front)."""


def cap(trials: int) -> int:
    """How many trials local moves may run in a study of ``trials``: half of them, rounded down."""
    return trials // 2


def feasible_front(trials: Sequence[Any], budget: float) -> tuple[list[Any], list[Any]]:
    """``(feasible, front)``: the completed trials with measurements (repeats left out) and at least one step
    whose validation drop is within ``budget`` points, and the non-dominated ones among them (on the trials'
    objective values, all measured on validation data), in trial order."""
    feasible = [t for t in trials if t.state.name == "COMPLETE" and t.values is not None
                and "size_ratio" in t.user_attrs and REPEAT not in t.user_attrs and t.user_attrs.get("steps")
                and t.user_attrs["val_accuracy_drop_points"] <= budget + 1e-9]
    return feasible, [feasible[i] for i in pareto_indices([list(t.values) for t in feasible])]


def middle(param: Param) -> Any:
    """The value an extension gives a searched option: fixed as fixed, the middle choice (index
    ``len // 2``), or the middle of the range (integers rounded half up)."""
    if param.is_fixed:
        return copy.deepcopy(param.fixed)
    if param.choices:
        return param.choices[len(param.choices) // 2]
    assert param.low is not None and param.high is not None
    mid = (param.low + param.high) / 2
    return math.floor(mid + 0.5) if param.integer else float(mid)


def _stage_step(params: Mapping[str, Any], space: SearchSpace, stage: str) -> str:
    return str(params.get(stage, space.stages.get(stage, (NONE,))[0]))


def extensions(params: Mapping[str, Any], space: SearchSpace, proxies: Proxies) -> list[dict[str, Any]]:
    """Every extension of a trial's parameters, in order: ``{"stage", "step", "params"}`` for each step of
    each stage after the pipeline's last step that the pipeline leaves at ``none`` (and the space lets vary)."""
    names = [s.name for s in STAGES]
    used = [i for i, name in enumerate(names) if _stage_step(params, space, name) != NONE]
    after = max(used, default=-1)
    out = []
    for name in names[after + 1:]:
        allowed = space.stages.get(name, (NONE,))
        if len(allowed) < 2 or _stage_step(params, space, name) != NONE:
            continue  # a stage the space fixes is never a move
        for step in allowed:
            if step == NONE:
                continue
            new = {**params, name: step}
            for param in space.params.get(step, {}).values():
                if not param.is_fixed:
                    new[param.name] = middle(param)
            if space.groups:
                for group_param in space.group_params(step, proxies):
                    new[group_param] = False
            out.append({"stage": name, "step": step, "params": new})
    return out + longer(params, space)


def longer(params: Mapping[str, Any], space: SearchSpace) -> list[dict[str, Any]]:
    """The *longer training* moves of a trial's parameters: for each training step it runs (a stage of
    :data:`~slimguard.search.space.RECOVERING_STAGES`) whose length (an option named ``...epochs``) the space
    searches among choices, the same parameters with the next longer choice, ``{"stage", "step", "params",
    "change"}`` each. A pruned model that recovered most of its accuracy in 3 epochs may recover the rest in
    6, which the sampler, drawing lengths independently of the pruning ratio, is slow to try."""
    out = []
    for name in RECOVERING_STAGES:
        step = _stage_step(params, space, name)
        if step == NONE:
            continue
        for param in space.params.get(step, {}).values():
            if param.is_fixed or not param.choices or not param.name.endswith("epochs") \
                    or param.name not in params:
                continue
            now = params[param.name]
            more = sorted(c for c in param.choices if isinstance(c, (int, float)) and c > now)
            if more:
                out.append({"stage": name, "step": step, "params": {**params, param.name: more[0]},
                            "change": f"{param.name} {now} -> {more[0]}"})
    return out


def _existing(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """The parameters of every trial in the study: drawn (``params``) or queued (``fixed_params``)."""
    out = []
    for t in trials:
        out.append(dict(t.params))
        fixed = t.system_attrs.get("fixed_params")
        if fixed:
            out.append(dict(fixed))
    return out


def _same_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)


def due(study_attrs: Mapping[str, Any], finished: int, waiting: int) -> bool:
    """Whether a round runs now: nothing queued, and the first round's or the next round's turn."""
    if waiting:
        return False
    rounds = study_attrs.get(ATTR, {}).get("rounds", [])
    if rounds:
        return finished >= int(rounds[-1]["after"]) + EVERY
    warm = len(study_attrs.get(WARM_ATTR, {}).get("enqueued", []))
    return finished >= (warm if warm else EVERY) and finished > 0


def plan_round(trials: Sequence[Any], space: SearchSpace, proxies: Proxies, *, budget: float, trials_total: int
               ) -> list[dict[str, Any]]:
    """The extensions one round queues, given the study's ``trials`` (see the module's rules):
    ``{"from", "stage", "step", "params", "options"}`` each."""
    _, front = feasible_front(trials, budget)
    front = sorted(front, key=lambda t: (list(t.values), t.number))
    finished = sum(t.state.name in ("COMPLETE", "PRUNED", "FAIL") and REPEAT not in t.user_attrs for t in trials)
    pending = sum(t.state.name in ("RUNNING", "WAITING") for t in trials)
    used = sum(TRIAL_MOVE in t.user_attrs for t in trials)
    room = min(trials_total - finished - pending, cap(trials_total) - used)
    seen = _existing(trials)
    per_point = [[{**e, "from": t.number, "options": copy.deepcopy(t.user_attrs.get(TRIAL_OPTIONS) or {})}
                  for e in extensions(t.params, space, proxies)] for t in front]
    out: list[dict[str, Any]] = []
    for rank in range(max((len(p) for p in per_point), default=0)):
        for moves in per_point:
            if len(out) >= room:
                return out
            if rank < len(moves) and not any(_same_params(moves[rank]["params"], s) for s in seen):
                out.append(moves[rank])
                seen.append(moves[rank]["params"])
    return out


class LocalMoves:
    """An Optuna callback (``(study, trial)``, called after every finished trial) that runs the rounds.

    Args:
        space, proxies: the study's space and proxies (extensions are built in them).
        budget: the accuracy budget in points (what makes a point feasible).
        trials: the study's ``--trials`` (queued extensions count against it).
        enabled: ``False`` (``--no-local-moves``) queues nothing and records that.
    """

    def __init__(self, space: SearchSpace, proxies: Proxies, *, budget: float, trials: int, enabled: bool) -> None:
        self.space, self.proxies, self.budget, self.trials, self.enabled = space, proxies, budget, trials, enabled

    def __call__(self, study: Any, trial: Any) -> None:
        if not self.enabled:
            return
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.name in ("COMPLETE", "PRUNED", "FAIL") and REPEAT not in t.user_attrs for t in trials)
        waiting = sum(t.state.name == "WAITING" for t in trials)
        if not due(study.user_attrs, finished, waiting):
            return
        moves = plan_round(trials, self.space, self.proxies, budget=self.budget, trials_total=self.trials)
        for move in moves:
            study.enqueue_trial(move["params"], user_attrs={
                TRIAL_MOVE: {"from": move["from"], "stage": move["stage"], "step": move["step"],
                             **({"change": move["change"]} if "change" in move else {})},
                TRIAL_OPTIONS: move["options"]})
        state = dict(study.user_attrs.get(ATTR) or record(study, enabled=True, trials=self.trials))
        queued = [{"from": m["from"], "stage": m["stage"], "step": m["step"],
                   **({"change": m["change"]} if "change" in m else {})} for m in moves]
        study.set_user_attr(ATTR, {**state, "rounds": [*state["rounds"], {"after": finished, "queued": queued}]})


def record(study: Any, *, enabled: bool, trials: int) -> dict[str, Any]:
    """Store whether this search makes local moves (and its rules' numbers) in the study, keeping the rounds
    a resumed study already ran; returns what was stored."""
    old = study.user_attrs.get(ATTR) or {}
    state = {"enabled": enabled, "every": EVERY, "cap": cap(trials), "rounds": list(old.get("rounds", []))}
    if state != old:
        study.set_user_attr(ATTR, state)
    return state


def stored(study: Any) -> dict[str, Any]:
    """What ``pareto.json`` reports as ``local_moves``: the study's rounds, and ``trials``, each trial a move
    queued (``{"trial", "from", "stage", "step", "state"}``)."""
    made = dict(study.user_attrs.get(ATTR) or {"enabled": False, "every": EVERY, "rounds": []})
    made["trials"] = [{"trial": t.number, **t.user_attrs[TRIAL_MOVE], "state": t.state.name.lower()}
                      for t in study.get_trials(deepcopy=False) if TRIAL_MOVE in t.user_attrs]
    return made
