"""When to checkpoint: policies that trade checkpoint overhead against work lost to failures.

A policy answers ``should_save(step, loss=None, manager=None)`` once per training step, after
the step. :class:`~lctriton.manager.CheckpointManager` asks it when built with
``schedule=policy``; the training-loop hooks go through the manager. Costs are measured
online: the checkpoint cost ``delta`` is the recent mean of ``manager.stall_seconds`` (how long
``save`` blocked the loop), the background cost the recent mean of
``manager.background_seconds``, and the step time is measured from the policy's clock between
calls (minus the stalls the manager recorded in between), unless the loop reports it with
:meth:`Policy.observe_step`, which then replaces the clock measurement.

Formulas (``delta`` checkpoint cost, ``M`` mean time between failures, ``T`` compute time
between checkpoints):

* Young (1974), "A first order approximation to the optimum checkpoint interval", CACM 17(9):
  ``T = sqrt(2 * delta * M)``.
* Daly (2006), "A higher order estimate of the optimum checkpoint interval for restart dumps",
  FGCS 22(3), doi:10.1016/j.future.2004.11.016, eq. (37): for ``delta < 2M``,
  ``T = sqrt(2 delta M) * [1 + (1/3) sqrt(delta/(2M)) + (1/9) (delta/(2M))] - delta``,
  else ``T = M``. The restart time does not enter the optimum. With ``delta`` = 5 min it gives
  116.7, 56.7 and 9.14 min for M = 24 h, 6 h and 15 min (the paper's 117, 57 and 9.1).
* CheckFreq (Mohan et al., FAST'21): the smallest interval whose overhead fraction
  ``stall / (k * step_time)`` stays within a budget (5 % by default), and never so short that a
  save would queue behind the previous background write (``k >= background / step_time``).
  CheckFreq grows ``k`` by 2 when a monitored window is over budget; :class:`Adaptive` instead
  recomputes ``k`` from the measurements and also keeps the *cumulative* overhead account
  within the budget, so a disk that slows down cannot push the run over it for long.
* COCI (Li et al., FGCS 2024, doi:10.1016/j.future.2024.107597): fit the loss curve as
  ``exp(theta1 t + theta2)`` and place checkpoints at equal decrements ``pc`` of the fitted
  loss, ``pc = (1 - exp(theta1 delta)) (1/(2 lambda) - 1/(2 theta1))``. Dense checkpoints
  early, where the loss falls fastest, protect the most valuable work.

What :class:`ConvergenceAware` changes from COCI, and why:

1. Scale-free progress. COCI compares ``pc`` (dimensionless) with loss values, so multiplying
   the loss by 10 gives 10 times as many checkpoints. Here progress is the fraction of the
   fitted total decrease achieved, ``P(t) = (f(t0) - f(t)) / (f(t0) - a)`` for
   ``f(t) = a + b exp(-c (t - t0))``, which is ``1 - exp(-c (t - t0))``: independent of the
   loss's scale *and* offset (a loss that tends to 2.3 instead of 0 is handled; COCI's pure
   exponential forces the asymptote to 0).
2. A fixed progress quantum between checkpoints (``quantum``), not a precomputed slot list.
   The decision is taken online from the current fit, so a refit cannot leave stale slots
   behind (COCI inserts new slots in front of the old ones on refit).
3. Bounded intervals. Once the loss flattens, equal progress would mean no checkpoints at all,
   yet redone work still costs wall-clock time. The interval is capped by Daly's optimum when
   the MTBF is known (else ``fallback_steps``) and floored by ``min_steps``; until
   ``warmup_points`` losses are seen it checkpoints every ``fallback_steps`` steps.
4. Robust fit. Non-finite losses are ignored (COCI fits a sentinel ``-1``); the fit is a
   grid search over the rate ``c`` with linear least squares for ``a`` and ``b``, refitted once
   after dropping points more than 4 robust standard deviations (MAD) off, so loss spikes and
   noise do not move the schedule; it needs no SciPy and cannot fail to converge. The history
   is decimated uniformly to ``max_points`` so memory and fit time stay bounded.
5. Steps, not wall minutes, as the time axis: checkpoint stalls and restarts do not warp the
   fitted curve.

:func:`simulate` runs each policy failure-free to get its checkpoint steps (a simulated clock
and manager feed it the same measurements a real run would), then replays that schedule under
seeded Monte Carlo failures: exponential with mean ``mtbf_seconds``, or gaps resampled from a
failure trace. A failure loses the work (and any checkpoint being written) since the last
completed checkpoint, costs ``restart_seconds``, and the segment is redone.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Adaptive",
    "ConvergenceAware",
    "EveryNSteps",
    "EveryTSeconds",
    "ExpFit",
    "Policy",
    "SimResult",
    "YoungDaly",
    "daly_interval",
    "fit_exponential",
    "format_results",
    "plot_simulation",
    "simulate",
    "young_interval",
]

log = logging.getLogger(__name__)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, or ValueError naming ``name`` if not a finite (non-)negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an int >= ``low``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def young_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Young's first-order optimum compute time between checkpoints, ``sqrt(2 delta M)``.

    Args:
        checkpoint_seconds: Checkpoint cost ``delta`` (seconds of blocked training).
        mtbf_seconds: Mean time between failures ``M``.

    Returns:
        The interval in seconds.

    Raises:
        ValueError: If an argument is not positive.
    """
    delta = _check_positive("checkpoint_seconds", checkpoint_seconds)
    mtbf = _check_positive("mtbf_seconds", mtbf_seconds)
    return math.sqrt(2.0 * delta * mtbf)


def daly_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints (Daly 2006, eq. 37).

    Args:
        checkpoint_seconds: Checkpoint cost ``delta``.
        mtbf_seconds: Mean time between failures ``M``.

    Returns:
        ``sqrt(2 delta M) [1 + sqrt(x)/3 + x/9] - delta`` with ``x = delta / (2M)`` when
        ``delta < 2M``, else ``M``.

    Raises:
        ValueError: If an argument is not positive.
    """
    delta = _check_positive("checkpoint_seconds", checkpoint_seconds)
    mtbf = _check_positive("mtbf_seconds", mtbf_seconds)
    if delta >= 2.0 * mtbf:
        # Checkpointing costs more than the expected run between failures: Daly's limit.
        return mtbf
    x = delta / (2.0 * mtbf)
    return math.sqrt(2.0 * delta * mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - delta


class Policy:
    """Base class of checkpoint policies; subclasses implement :meth:`_decide`.

    Step time: measured from ``clock`` between consecutive :meth:`should_save` calls, divided
    by the steps elapsed, minus the stalls the manager recorded in between (without a manager,
    an interval that follows a save is skipped, as it holds the save). After the first
    :meth:`observe_step`, only observed step times are used.

    Args:
        clock: Monotonic seconds; the simulator replaces it with simulated time.
        cost_window: Saves over which the checkpoint cost is averaged.
        step_window: Step-time samples whose median is the step time (robust to slow steps
            such as evaluations).

    Raises:
        ValueError: If a window is not a positive int.
    """

    name = "policy"
    _absolute = False

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter, cost_window: int = 5,
                 step_window: int = 32) -> None:
        self._clock = clock
        self.cost_window = _check_int("cost_window", cost_window)
        self.step_window = _check_int("step_window", step_window)
        self.reset()

    def reset(self) -> None:
        """Forget all run-time state (measurements, last save), keeping the configuration."""
        self._step_samples: deque[float] = deque(maxlen=self.step_window)
        self._explicit_steps = False
        self._prev_time: float | None = None
        self._prev_step: int | None = None
        self._prev_stalls = 0
        self._stall_base: int | None = None
        self._just_saved = False
        self._last_saved: int | None = None
        self.saves = 0
        #: Seconds of training (stalls excluded) seen since the first call.
        self.train_seconds = 0.0

    # -- measurements ---------------------------------------------------------------------
    def observe_step(self, seconds: float) -> None:
        """Report one step's duration; from now on the clock is not used for step time.

        Raises:
            ValueError: If ``seconds`` is negative or not finite.
        """
        seconds = _check_positive("seconds", seconds, allow_zero=True)
        self._explicit_steps = True
        self._step_samples.append(seconds)
        self.train_seconds += seconds

    @property
    def step_seconds(self) -> float | None:
        """The measured step time (median of recent samples), or None before any."""
        return statistics.median(self._step_samples) if self._step_samples else None

    def checkpoint_seconds(self, manager: Any = None) -> float | None:
        """The measured checkpoint cost: mean of the manager's recent stalls, or None."""
        stalls = getattr(manager, "stall_seconds", None)
        if stalls:
            recent = stalls[-self.cost_window:]
            return sum(recent) / len(recent)
        return None

    def background_seconds(self, manager: Any = None) -> float | None:
        """Mean of the manager's recent background (compress + write) times, or None."""
        bg = getattr(manager, "background_seconds", None)
        if bg:
            recent = bg[-self.cost_window:]
            return sum(recent) / len(recent)
        return None

    def _measure(self, step: int, manager: Any) -> None:
        now = self._clock()
        stalls = getattr(manager, "stall_seconds", None)
        n_stalls = len(stalls) if stalls is not None else 0
        if self._stall_base is None:
            self._stall_base = n_stalls
        if self._prev_time is not None and self._prev_step is not None and step > self._prev_step:
            elapsed = now - self._prev_time
            usable = True
            if stalls is not None:
                # The save between the calls blocked the loop; that time is not step time.
                elapsed -= sum(stalls[self._prev_stalls:n_stalls])
            elif self._just_saved:
                usable = False
            if usable and elapsed >= 0 and not self._explicit_steps:
                self._step_samples.append(elapsed / (step - self._prev_step))
                self.train_seconds += elapsed
        self._prev_time = now
        self._prev_step = step
        self._prev_stalls = n_stalls

    def _steps(self, seconds: float) -> int | None:
        """``seconds`` of training in whole steps (at least 1), or None without a step time."""
        step_s = self.step_seconds
        if not step_s or step_s <= 0:
            return None
        return max(1, round(seconds / step_s))

    # -- decision -------------------------------------------------------------------------
    def since_save(self, step: int) -> int:
        """Steps since the last save (or since the first call)."""
        return step - (self._last_saved if self._last_saved is not None else step)

    def should_save(self, step: int, loss: Any = None, manager: Any = None) -> bool:
        """Whether to checkpoint after training step ``step``.

        Args:
            step: The step just finished; non-decreasing across calls.
            loss: Its loss (a float or a one-element tensor), if known.
            manager: The :class:`~lctriton.manager.CheckpointManager` asking, whose
                ``stall_seconds`` and ``background_seconds`` give the checkpoint costs.

        Returns:
            True to save now.

        Raises:
            ValueError: If ``step`` is not an int >= 0.
        """
        _check_int("step", step, 0)
        self._measure(step, manager)
        if self._last_saved is None:
            self._last_saved = step  # the reference point: the start of this run
            first = True
        else:
            first = False
        value = None
        if loss is not None:
            try:
                value = float(loss)
            except (TypeError, ValueError):
                value = None
        # Relative policies count from the first call; an absolute one (every n-th step) may
        # save on it.
        decision = bool(self._decide(step, value, manager)) and (self._absolute or not first)
        self._just_saved = decision
        if decision:
            self._last_saved = step
            self.saves += 1
            log.debug("%s: checkpoint at step %d", self.name, step)
        return decision

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class EveryNSteps(Policy):
    """Checkpoint at every step that is a multiple of ``n`` (as the manager's ``every``).

    Args:
        n: The interval in steps.
        **kwargs: Options of :class:`Policy`.

    Raises:
        ValueError: If ``n`` is not a positive int.
    """

    _absolute = True

    def __init__(self, n: int, **kwargs: Any) -> None:
        self.n = _check_int("n", n)
        self.name = f"every {n} steps"
        super().__init__(**kwargs)

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        return step % self.n == 0


class EveryTSeconds(Policy):
    """Checkpoint once ``seconds`` of wall-clock time have passed since the last one.

    Args:
        seconds: The interval.
        clock: Monotonic seconds (default :func:`time.monotonic`).
        **kwargs: Options of :class:`Policy`.

    Raises:
        ValueError: If ``seconds`` is not positive.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic,
                 **kwargs: Any) -> None:
        self.seconds = _check_positive("seconds", seconds)
        self.name = f"every {seconds:g} s"
        super().__init__(clock=clock, **kwargs)

    def reset(self) -> None:
        """Forget run-time state."""
        super().reset()
        self._last_time: float | None = None

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        now = self._clock()
        if self._last_time is None:
            self._last_time = now
            return False
        if now - self._last_time >= self.seconds:
            self._last_time = now
            return True
        return False


class YoungDaly(Policy):
    """The optimum interval of Young or Daly from the checkpoint cost and the MTBF.

    Args:
        mtbf_seconds: Mean time between failures.
        checkpoint_seconds: Checkpoint cost; None measures it online (mean recent stall).
        restart_seconds: Restart cost, kept for reports; it does not enter the optimum.
        formula: ``"daly"`` (higher order) or ``"young"``.
        initial_steps: Interval until the cost and the step time are known.
        **kwargs: Options of :class:`Policy`.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(self, mtbf_seconds: float, checkpoint_seconds: float | None = None,
                 restart_seconds: float = 0.0, formula: str = "daly", initial_steps: int = 100,
                 **kwargs: Any) -> None:
        self.mtbf_seconds = _check_positive("mtbf_seconds", mtbf_seconds)
        self.fixed_cost = (None if checkpoint_seconds is None
                           else _check_positive("checkpoint_seconds", checkpoint_seconds))
        self.restart_seconds = _check_positive("restart_seconds", restart_seconds, allow_zero=True)
        if formula not in ("daly", "young"):
            raise ValueError(f"formula must be 'daly' or 'young', got {formula!r}")
        self.formula = formula
        self.initial_steps = _check_int("initial_steps", initial_steps)
        self.name = formula
        super().__init__(**kwargs)

    def interval_seconds(self, manager: Any = None) -> float | None:
        """The optimum compute time between checkpoints, or None while the cost is unknown."""
        cost = self.fixed_cost if self.fixed_cost is not None else self.checkpoint_seconds(manager)
        if not cost:
            return None
        fn = daly_interval if self.formula == "daly" else young_interval
        return fn(cost, self.mtbf_seconds)

    def interval_steps(self, manager: Any = None) -> int:
        """The optimum interval in steps (``initial_steps`` until it can be computed)."""
        seconds = self.interval_seconds(manager)
        steps = self._steps(seconds) if seconds is not None else None
        return steps if steps is not None else self.initial_steps

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        return self.since_save(step) >= self.interval_steps(manager)


class Adaptive(Policy):
    """CheckFreq's idea: checkpoint as often as the measured overhead budget allows.

    Saves when (1) at least ``ceil(stall / (budget * step_time))`` steps have passed, (2) the
    previous background write has had time to finish (``background / step_time`` steps), and
    (3) the cumulative account stays within budget: ``(stalls so far + next stall) <= budget *
    training seconds so far``. The next stall is estimated by the largest recent stall, so a
    slowing disk is met with longer intervals at once.

    Args:
        budget: Largest fraction of training time spent blocked in saves.
        checkpoint_seconds: Stall per save when no manager reports it.
        initial_steps: Steps before the first (measuring) save.
        **kwargs: Options of :class:`Policy`.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(self, budget: float = 0.05, checkpoint_seconds: float | None = None,
                 initial_steps: int = 10, **kwargs: Any) -> None:
        self.budget = _check_positive("budget", budget)
        if self.budget >= 1:
            raise ValueError(f"budget must be < 1, got {budget!r}")
        self.fixed_cost = (None if checkpoint_seconds is None
                           else _check_positive("checkpoint_seconds", checkpoint_seconds))
        self.initial_steps = _check_int("initial_steps", initial_steps)
        self.name = f"adaptive {budget:.0%}"
        super().__init__(**kwargs)

    def _stalls(self, manager: Any) -> list[float]:
        stalls = getattr(manager, "stall_seconds", None)
        if stalls is not None and self._stall_base is not None:
            return list(stalls[self._stall_base:])
        return [self.fixed_cost] * self.saves if self.fixed_cost is not None else []

    def overhead_fraction(self, manager: Any = None) -> float:
        """Stall seconds over training seconds since this policy started."""
        return sum(self._stalls(manager)) / self.train_seconds if self.train_seconds > 0 else 0.0

    def interval_steps(self, manager: Any = None) -> int | None:
        """The shortest interval the budget and the background writes allow, if known."""
        stalls = self._stalls(manager) or ([self.fixed_cost] if self.fixed_cost else [])
        if not stalls or not self.step_seconds:
            return None
        est = max(stalls[-self.cost_window:])
        k = math.ceil(est / (self.budget * self.step_seconds))
        bg = self.background_seconds(manager)
        if bg:
            k = max(k, math.ceil(bg / self.step_seconds))
        return max(1, k)

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        k = self.interval_steps(manager)
        since = self.since_save(step)
        if k is None:
            return since >= self.initial_steps
        if since < k:
            return False
        stalls = self._stalls(manager) or [self.fixed_cost or 0.0]
        est = max(stalls[-self.cost_window:])
        return sum(self._stalls(manager)) + est <= self.budget * self.train_seconds


@dataclass(frozen=True)
class ExpFit:
    """A fitted loss curve ``loss(t) = a + b * exp(-c * (t - t0))``."""

    a: float
    b: float
    c: float
    t0: float

    def __call__(self, t: Any) -> Any:
        return self.a + self.b * np.exp(-self.c * (np.asarray(t, dtype=float) - self.t0))

    def progress(self, t: float) -> float:
        """Fraction of the total fitted decrease achieved at ``t``: ``1 - exp(-c (t - t0))``.

        Scale- and offset-free: it does not depend on ``a`` or ``b``.
        """
        return 1.0 - math.exp(-self.c * max(0.0, t - self.t0))


def _lsq_exp(x: np.ndarray, y: np.ndarray, rates: np.ndarray) -> tuple[float, float, float, float]:
    """Best (sse, a, b, c) of ``y ~ a + b exp(-c x)`` over the grid of rates ``c``."""
    e = np.exp(-np.outer(rates, x))  # (rates, points)
    n = x.size
    se, see = e.sum(1), (e * e).sum(1)
    sy, sey = y.sum(), e @ y
    det = n * see - se * se
    ok = det > 1e-12 * n * np.maximum(see, 1e-300)
    det = np.where(ok, det, 1.0)
    b = np.where(ok, (n * sey - se * sy) / det, 0.0)
    a = (sy - b * se) / n
    resid = y[None, :] - a[:, None] - b[:, None] * e
    sse = np.where(ok, (resid * resid).sum(1), np.inf)
    i = int(np.argmin(sse))
    return float(sse[i]), float(a[i]), float(b[i]), float(rates[i])


def fit_exponential(steps: Sequence[float], losses: Sequence[float], *,
                    grid: int = 64) -> ExpFit | None:
    """Fit ``a + b exp(-c (t - t0))`` robustly; None unless the fitted loss decreases.

    The rate ``c`` is searched on a log grid from ``0.01`` to ``100`` over the span of the data
    (for each rate, ``a`` and ``b`` by linear least squares); points more than 4 robust
    standard deviations (1.4826 MAD) off the first fit are dropped and the fit repeated.
    Multiplying or shifting the losses scales or shifts ``a`` and ``b`` and leaves ``c`` alone.

    Args:
        steps: Time axis (steps) of the points.
        losses: The losses; non-finite ones are ignored.
        grid: Rates tried.

    Returns:
        The fit, or None with fewer than 4 finite points or a non-decreasing curve.
    """
    x = np.asarray(steps, dtype=float)
    y = np.asarray(losses, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 4:
        return None
    t0 = float(x.min())
    x = x - t0
    span = float(x.max())
    if span <= 0:
        return None
    rates = np.geomspace(0.01 / span, 100.0 / span, grid)
    _, a, b, c = _lsq_exp(x, y, rates)
    resid = y - (a + b * np.exp(-c * x))
    mad = float(np.median(np.abs(resid - np.median(resid))))
    if mad > 0:
        inliers = np.abs(resid) <= 4 * 1.4826 * mad
        if 4 <= inliers.sum() < x.size:
            _, a, b, c = _lsq_exp(x[inliers], y[inliers], rates)
    if not b > 0:
        return None
    return ExpFit(a=a, b=b, c=c, t0=t0)


class ConvergenceAware(Policy):
    """COCI, made scale-free: a checkpoint per ``quantum`` of fitted convergence progress.

    Progress is the fraction of the fitted total loss decrease achieved (see the module
    docstring for the changes from COCI). Saves when at least ``min_steps`` have passed and
    either the progress since the last save reaches ``quantum`` or the interval reaches the
    maximum: ``max_steps``, else Daly's optimum when ``mtbf_seconds`` is given and the cost is
    known, else ``fallback_steps``.

    Args:
        quantum: Progress (fraction of the total decrease) between checkpoints.
        mtbf_seconds: Mean time between failures, for the Daly cap.
        checkpoint_seconds: Checkpoint cost; None measures it online.
        min_steps: Smallest interval.
        max_steps: Largest interval; None for the Daly cap or ``fallback_steps``.
        fallback_steps: Interval before the fit exists (and the cap without an MTBF).
        warmup_points: Finite losses needed before the first fit.
        max_points: Points kept for fitting (the history is decimated uniformly).
        refit_every: Refit after this many new points (or 5 % of the points, if more).
        **kwargs: Options of :class:`Policy`.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(self, quantum: float = 0.02, *, mtbf_seconds: float | None = None,
                 checkpoint_seconds: float | None = None, min_steps: int = 1,
                 max_steps: int | None = None, fallback_steps: int = 100,
                 warmup_points: int = 20, max_points: int = 512, refit_every: int = 10,
                 **kwargs: Any) -> None:
        self.quantum = _check_positive("quantum", quantum)
        if self.quantum >= 1:
            raise ValueError(f"quantum must be < 1, got {quantum!r}")
        self.mtbf_seconds = (None if mtbf_seconds is None
                             else _check_positive("mtbf_seconds", mtbf_seconds))
        self.fixed_cost = (None if checkpoint_seconds is None
                           else _check_positive("checkpoint_seconds", checkpoint_seconds))
        self.min_steps = _check_int("min_steps", min_steps)
        self.max_steps = None if max_steps is None else _check_int("max_steps", max_steps)
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ValueError(f"max_steps must be >= min_steps, got {max_steps!r} < {min_steps!r}")
        self.fallback_steps = _check_int("fallback_steps", fallback_steps)
        self.warmup_points = _check_int("warmup_points", warmup_points, 4)
        self.max_points = _check_int("max_points", max_points, 8)
        self.refit_every = _check_int("refit_every", refit_every)
        self.name = "convergence-aware"
        super().__init__(**kwargs)

    def reset(self) -> None:
        """Forget run-time state, the loss history and the fit."""
        super().reset()
        self._xs: list[float] = []
        self._ys: list[float] = []
        self._seen = 0
        self._stride = 1
        self._fitted_at = 0
        self.fit: ExpFit | None = None

    def _record(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return  # a NaN/inf loss says nothing about convergence
        self._seen += 1
        if (self._seen - 1) % self._stride == 0:
            self._xs.append(float(step))
            self._ys.append(loss)
            if len(self._xs) > 2 * self.max_points:
                # Keep every other point and halve the sampling rate: uniform over the run.
                self._xs, self._ys = self._xs[::2], self._ys[::2]
                self._stride *= 2
        due = max(self.refit_every, self._seen // 20)
        stale = self.fit is None or self._seen - self._fitted_at >= due
        if self._seen >= self.warmup_points and stale:
            fit = fit_exponential(self._xs, self._ys)
            self._fitted_at = self._seen
            if fit is not None or self.fit is None:
                self.fit = fit

    def max_interval(self, manager: Any = None) -> int:
        """The cap on the interval in steps."""
        if self.max_steps is not None:
            return self.max_steps
        if self.mtbf_seconds is not None:
            cost = self.fixed_cost
            if cost is None:
                cost = self.checkpoint_seconds(manager)
            if cost:
                steps = self._steps(daly_interval(cost, self.mtbf_seconds))
                if steps is not None:
                    return max(self.min_steps, steps)
        return max(self.min_steps, self.fallback_steps)

    def _decide(self, step: int, loss: float | None, manager: Any) -> bool:
        if loss is not None:
            self._record(step, loss)
        since = self.since_save(step)
        if since < self.min_steps:
            return False
        cap = self.max_interval(manager)
        if since >= cap:
            return True
        if self.fit is None:
            return since >= min(cap, self.fallback_steps)
        last = self._last_saved if self._last_saved is not None else step
        return self.fit.progress(step) - self.fit.progress(last) >= self.quantum


# -- simulation ---------------------------------------------------------------------------

class _SimClock:
    """Simulated seconds; policies read it through ``now``."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class _SimManager:
    """What a policy reads from a manager: the per-save stall and background times."""

    def __init__(self) -> None:
        self.stall_seconds: list[float] = []
        self.background_seconds: list[float] = []


@dataclass(frozen=True)
class SimResult:
    """Expected costs of one policy over the Monte Carlo trials (all in seconds, means).

    Attributes:
        name: The policy's name.
        checkpoint_steps: Steps it checkpoints at (failure-free schedule).
        useful_seconds: Compute the run needs without failures or checkpoints.
        overhead_seconds: Completed checkpoints times their cost.
        lost_seconds: Work (and partial checkpoints) lost to failures and redone.
        restart_seconds: Restarts after failures.
        total_seconds: Wall-clock time to finish: the sum of the above.
        total_std_seconds: Standard deviation of the total over the trials.
        failures: Mean failures per run.
    """

    name: str
    checkpoint_steps: tuple[int, ...]
    useful_seconds: float
    overhead_seconds: float
    lost_seconds: float
    restart_seconds: float
    total_seconds: float
    total_std_seconds: float
    failures: float

    @property
    def checkpoints(self) -> int:
        """Number of checkpoints."""
        return len(self.checkpoint_steps)

    @property
    def wasted_seconds(self) -> float:
        """Total time beyond the useful compute."""
        return self.total_seconds - self.useful_seconds


def _loss_values(loss_curve: Any, steps: int) -> np.ndarray | None:
    if loss_curve is None:
        return None
    if callable(loss_curve):
        values = np.array([float(loss_curve(s)) for s in range(1, steps + 1)])
    else:
        values = np.asarray(loss_curve, dtype=float).ravel()
        if values.size < steps:
            raise ValueError(f"loss_curve has {values.size} values, fewer than steps={steps}")
        values = values[:steps]
    return values


def _schedule(policy: Policy, steps: int, step_seconds: float, checkpoint_seconds: float,
              losses: np.ndarray | None) -> tuple[int, ...]:
    """The steps ``policy`` checkpoints at in a failure-free run fed simulated measurements."""
    p = copy.deepcopy(policy)
    clock, manager = _SimClock(), _SimManager()
    p._clock = clock.now  # simulated time replaces the wall clock
    p.reset()
    saved = []
    for step in range(1, steps + 1):
        clock.t += step_seconds
        loss = None if losses is None else losses[step - 1]
        if p.should_save(step, loss, manager):
            saved.append(step)
            clock.t += checkpoint_seconds
            manager.stall_seconds.append(checkpoint_seconds)
            manager.background_seconds.append(0.0)
    return tuple(saved)


def simulate(policies: Mapping[str, Policy] | Sequence[Policy], *, steps: int,
             step_seconds: float, checkpoint_seconds: float, mtbf_seconds: float | None = None,
             failure_trace: Sequence[float] | None = None, loss_curve: Any = None,
             restart_seconds: float = 0.0, trials: int = 200,
             seed: int = 0) -> dict[str, SimResult]:
    """Monte Carlo expected lost work, overhead and total time of each policy.

    Args:
        policies: Policies by name (or a sequence, named by their ``name``); they are copied,
            not changed.
        steps: Training steps of the run.
        step_seconds: Seconds per step.
        checkpoint_seconds: Blocking cost of a checkpoint.
        mtbf_seconds: Mean time between (exponential) failures.
        failure_trace: Increasing failure times in seconds, instead of ``mtbf_seconds``; each
            trial resamples its gaps.
        loss_curve: Loss per step: a callable ``step -> loss`` or a sequence indexed from
            step 1; needed by :class:`ConvergenceAware`.
        restart_seconds: Cost of each restart (failures during a restart are not modelled).
        trials: Monte Carlo runs.
        seed: Seed of the failure draws.

    Returns:
        A :class:`SimResult` per policy name, in the order given.

    Raises:
        ValueError: If an argument is invalid or both/neither of ``mtbf_seconds`` and
            ``failure_trace`` are given.
    """
    steps = _check_int("steps", steps)
    step_seconds = _check_positive("step_seconds", step_seconds)
    checkpoint_seconds = _check_positive("checkpoint_seconds", checkpoint_seconds, allow_zero=True)
    restart_seconds = _check_positive("restart_seconds", restart_seconds, allow_zero=True)
    trials = _check_int("trials", trials)
    if (mtbf_seconds is None) == (failure_trace is None):
        raise ValueError("give exactly one of mtbf_seconds and failure_trace")
    if mtbf_seconds is not None:
        mtbf = _check_positive("mtbf_seconds", mtbf_seconds)
        gaps = None
    else:
        times = np.asarray(failure_trace, dtype=float).ravel()
        if (times.size < 1 or not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0)
                or times[0] <= 0):
            raise ValueError("failure_trace must be positive, increasing failure times in seconds")
        gaps = np.diff(np.concatenate([[0.0], times]))
        mtbf = float(gaps.mean())
    if isinstance(policies, Mapping):
        named = dict(policies)
    else:
        named = {}
        for p in policies:
            if p.name in named:
                raise ValueError(f"policies: two are named {p.name!r}; pass a mapping")
            named[p.name] = p
    if not named:
        raise ValueError("policies must not be empty")
    losses = _loss_values(loss_curve, steps)
    if losses is None and any(isinstance(p, ConvergenceAware) for p in named.values()):
        raise ValueError("loss_curve is needed to simulate a ConvergenceAware policy")

    results = {}
    for i, (name, policy) in enumerate(named.items()):
        if not isinstance(policy, Policy):
            raise ValueError(f"policies[{name!r}] is not a Policy: {policy!r}")
        ckpts = _schedule(policy, steps, step_seconds, checkpoint_seconds, losses)
        bounds = np.array((0,) + ckpts, dtype=float)
        seg = np.diff(np.append(bounds, steps)) * step_seconds
        seg[: len(ckpts)] += checkpoint_seconds  # a segment is done when its checkpoint is
        seg = seg[seg > 0]
        # The same seed for every policy: common random numbers make the comparison sharper.
        rng = np.random.default_rng(seed)

        def draw(n: int, rng: np.random.Generator = rng) -> np.ndarray:
            if gaps is None:
                return rng.exponential(mtbf, n)
            return rng.choice(gaps, n)

        ttf = draw(trials)
        lost = np.zeros(trials)
        fails = np.zeros(trials)
        for length in seg:
            hit = ttf < length
            while hit.any():
                # Work since the last completed checkpoint is lost; restart, redo the segment.
                lost[hit] += ttf[hit]
                fails[hit] += 1
                ttf[hit] = draw(int(hit.sum()))
                hit &= ttf < length
            ttf -= length
        useful = steps * step_seconds
        overhead = len(ckpts) * checkpoint_seconds
        total = useful + overhead + lost + fails * restart_seconds
        results[name] = SimResult(
            name=name, checkpoint_steps=ckpts, useful_seconds=useful,
            overhead_seconds=overhead, lost_seconds=float(lost.mean()),
            restart_seconds=float(fails.mean() * restart_seconds),
            total_seconds=float(total.mean()), total_std_seconds=float(total.std()),
            failures=float(fails.mean()))
        log.info("simulated %s (%d/%d): %d checkpoints, total %.0f s", name, i + 1,
                 len(named), len(ckpts), results[name].total_seconds)
    return results


def format_results(results: Mapping[str, SimResult]) -> str:
    """A text table of simulation results, best total first, times in hours."""
    head = (f"{'policy':<22} {'ckpts':>6} {'lost h':>8} {'overhead h':>11} {'restart h':>10} "
            f"{'total h':>9} {'± sd':>7} {'failures':>9}")
    rows = [head, "-" * len(head)]
    for r in sorted(results.values(), key=lambda r: r.total_seconds):
        rows.append(f"{r.name:<22} {r.checkpoints:>6} {r.lost_seconds / 3600:>8.3f} "
                    f"{r.overhead_seconds / 3600:>11.3f} {r.restart_seconds / 3600:>10.3f} "
                    f"{r.total_seconds / 3600:>9.3f} {r.total_std_seconds / 3600:>7.3f} "
                    f"{r.failures:>9.2f}")
    return "\n".join(rows)


def plot_simulation(results: Mapping[str, SimResult], path: str | Path, *, steps: int,
                    loss_curve: Any = None) -> Path:
    """Write a PNG: when each policy checkpoints (over the loss curve) and what each loses.

    Uses matplotlib's Agg canvas directly, so the global backend is left alone.

    Args:
        results: From :func:`simulate`.
        path: The PNG to write.
        steps: Steps of the run (the x range).
        loss_curve: The loss per step, drawn behind the checkpoint marks.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names = list(results)
    fig = Figure(figsize=(10, 3 + 0.9 * len(names)))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    losses = _loss_values(loss_curve, steps)
    if losses is not None:
        twin = top.twinx()
        twin.plot(np.arange(1, steps + 1), losses, color="0.7", lw=1)
        twin.set_ylabel("loss", color="0.5")
    top.eventplot([list(results[n].checkpoint_steps) for n in names],
                  lineoffsets=range(len(names)), linelengths=0.7,
                  colors=[f"C{i}" for i in range(len(names))])
    top.set_yticks(range(len(names)), labels=names)
    top.set_xlim(0, steps)
    top.set_xlabel("step")
    top.set_title("checkpoints per policy")
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for field_name, label, color in (("overhead_seconds", "checkpoint overhead", "C0"),
                                     ("lost_seconds", "lost work", "C3"),
                                     ("restart_seconds", "restarts", "C7")):
        vals = np.array([getattr(results[n], field_name) for n in names]) / 3600
        bottom.barh(y, vals, left=left, color=color, label=label)
        left += vals
    bottom.set_yticks(y, labels=names)
    bottom.set_xlabel("expected hours beyond the useful compute")
    bottom.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
