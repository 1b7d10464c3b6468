"""`pyroflows.infer.train_guide`: the recipe, the stopping rule, annealing and its contract."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.util import is_validation_enabled
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyroflows.infer import GuideTraining, train_guide
from pyroflows.infer.train import _plate_nesting, _Temper

SIGMA, PRIOR_SD = 2.0, 10.0


def normal_model(x: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), PRIOR_SD))
    with pyro.plate("n", len(x)):
        pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)


def exact_posterior(x: torch.Tensor) -> tuple[float, float]:
    precision = PRIOR_SD**-2 + len(x) / SIGMA**2
    return float(x.sum() / SIGMA**2 / precision), precision**-0.5


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randn(20, dtype=torch.float64) * SIGMA + 1.0


class Scripted:
    """A stand-in ELBO: returns the given losses in turn, with gradient 1 for param ``p``."""

    def __init__(self, losses):
        self.losses = iter(losses)
        self.calls = 0

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        self.calls += 1
        pyro.param("p", torch.zeros((), dtype=torch.float64)).backward()
        return next(self.losses)


def noop() -> None:
    pass


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal])
def test_recovers_the_conjugate_normal_posterior(data, guide_class):
    guide = guide_class(normal_model)
    history = train_guide(normal_model, guide, data, window=50, progress=False)
    assert history.stopped == "converged" and history.nonfinite_steps == 0
    mean, sd = exact_posterior(data)
    with torch.no_grad():
        if guide_class is AutoNormal:
            got_mean, got_sd = guide.locs.mu.item(), guide.scales.mu.item()
        else:
            posterior = guide.get_posterior()
            got_mean, got_sd = posterior.mean.item(), posterior.stddev.item()
    # 16 particles at lr 1e-4: the optimum is found to a few hundredths of a posterior sd.
    assert abs(got_mean - mean) < 0.1 * sd
    assert got_sd == pytest.approx(sd, rel=0.1)
    assert history.final_loss == pytest.approx(sum(history.losses[-50:]) / 50)
    assert list(history.elbo) == [-x for x in history.losses]


def test_stops_on_an_easy_problem_after_decaying_the_learning_rate(data):
    history = train_guide(
        normal_model, AutoNormal(normal_model), data, window=50, max_steps=50_000, progress=False
    )
    assert history.stopped == "converged" and history.num_steps < 5_000
    assert history.num_steps % 50 == 0
    assert history.lrs[0] == 1e-2 and history.lrs[-1] == 1e-4
    assert len(set(history.lrs)) > 2 and history.lrs == sorted(history.lrs, reverse=True)
    assert len(history.losses) == len(history.seconds) == len(history.lrs) == history.num_steps
    assert history.seconds == sorted(history.seconds)
    assert "converged" in repr(history) and str(history.num_steps) in history.summary()


def test_the_stopping_rule_exactly():
    # Window 1 sets the best mean; windows 2-4 are noise, not clear improvements: the rate
    # decays 1e-2 -> 1e-3 -> 1e-4 (= min_lr) and the fourth window stops training.
    noise = [0.0, 1.0] * 5
    loss = Scripted([10 + x for x in noise * 100])
    history = train_guide(
        noop, noop, loss=loss, window=10, decay=0.1, max_steps=10**9, progress=False
    )
    assert (history.num_steps, history.stopped, loss.calls) == (40, "converged", 40)
    assert history.lrs == [1e-2] * 20 + [1e-3] * 10 + [1e-4] * 10
    assert pyro.param("p").item() < 0  # the optimizer stepped on the (scripted) gradient


def test_clear_improvements_keep_the_learning_rate():
    # Each window is 1 below the last with sd 0.5: 2 s.e. = 0.33, a clear improvement.
    loss = Scripted(100 - i / 10 + (i % 2) for i in itertools.count())
    history = train_guide(noop, noop, loss=loss, window=10, max_steps=300, progress=False)
    assert history.stopped == "max_steps" and history.num_steps == 300
    assert set(history.lrs) == {1e-2}


def test_stops_on_a_noisy_problem_even_with_a_huge_budget(data):
    # One particle: the loss is noisy, and most windows are no clear improvement.
    history = train_guide(
        normal_model,
        AutoNormal(normal_model),
        data,
        num_particles=1,
        window=20,
        max_steps=10**9,
        progress=False,
    )
    assert history.stopped == "converged" and history.num_steps < 3_000


def test_nonfinite_steps_are_skipped_and_counted():
    values = {}

    def record(step, loss):
        values[step] = pyro.param("p").item()

    losses = [1.0, math.nan, 2.0, math.inf, math.nan, 3.0]
    history = train_guide(
        noop, noop, loss=Scripted(losses), max_steps=6, callback=record, progress=False
    )
    assert history.nonfinite_steps == 3 and history.stopped == "max_steps"
    assert values[1] == values[0] and values[4] == values[3] == values[2] != values[1]
    assert values[5] != values[4]
    assert history.final_loss == pytest.approx(2.0)


def test_a_run_of_nonfinite_losses_raises():
    with pytest.raises(RuntimeError, match="20 consecutive steps had a non-finite loss"):
        train_guide(noop, noop, loss=Scripted([1.0] + [math.nan] * 30), progress=False)


def test_a_nonfinite_gradient_skips_the_step(data):
    def model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), PRIOR_SD))
        # Zero, with a nan gradient (from the branch torch.where does not take).
        pyro.factor("bad", torch.where(mu.abs() < 1e9, 0 * mu, torch.sqrt(-mu.abs() - 1)))

    guide = AutoNormal(model)
    guide(data)
    before = guide.locs.mu.detach().clone()
    with pytest.raises(RuntimeError, match="20 consecutive steps had a non-finite loss or grad"):
        train_guide(model, guide, data, progress=False)
    torch.testing.assert_close(guide.locs.mu.detach(), before, rtol=0, atol=0)


def test_custom_loss_and_optimizer_are_used(data):
    made = []

    class Counting(pyro.infer.Trace_ELBO):
        calls = 0

        def loss_and_grads(self, *args, **kwargs):
            Counting.calls += 1
            return super().loss_and_grads(*args, **kwargs)

    def sgd(params):
        made.append(params)
        return torch.optim.SGD(params, lr=1e-3)

    history = train_guide(
        normal_model,
        AutoNormal(normal_model),
        data,
        loss=Counting(),
        optimizer=sgd,
        max_steps=30,
        window=10,
        progress=False,
    )
    assert Counting.calls == history.num_steps == 30
    assert len(made) == 1 and all(isinstance(p, torch.Tensor) for p in made[0])
    assert set(history.lrs) == {1e-2}  # the schedule's rate; SGD's own groups scale with it


def test_params_created_later_join_the_optimizer():
    calls = itertools.count()

    def guide():
        if next(calls) >= 3:  # a second parameter from the fourth step on
            pyro.param("b", torch.zeros(()))

    def model():
        b = pyro.param("b") if "b" in pyro.get_param_store() else 0.0
        pyro.factor("f", -((pyro.param("a", torch.zeros(())) - 1) ** 2) - (b - 1) ** 2)

    train_guide(model, guide, loss=pyro.infer.Trace_ELBO(), max_steps=10, progress=False)
    assert pyro.param("a").item() == pytest.approx(0.1, abs=0.01)  # Adam: ~lr per step
    assert pyro.param("b").item() == pytest.approx(0.07, abs=0.01)


def test_callback_is_called_once_per_step(data):
    calls = []
    history = train_guide(
        normal_model,
        AutoNormal(normal_model),
        data,
        max_steps=25,
        callback=lambda step, loss: calls.append((step, loss)),
        progress=False,
    )
    assert calls == list(enumerate(history.losses)) and len(calls) == 25


def test_temper_scales_observed_sites_only():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
        pyro.factor("f", -(z**2))

    trace = pyro.poutine.trace(_Temper(0.3)(model)).get_trace()
    assert trace.nodes["z"]["scale"] == 1.0
    assert trace.nodes["x"]["scale"] == trace.nodes["f"]["scale"] == pytest.approx(0.3)


def test_annealing_tempers_the_likelihood_then_stops_for_the_rule():
    # The factor -1000 enters the loss as +1000 beta: the loss follows beta's schedule.
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(-1000.0))

    history = train_guide(
        model,
        AutoNormal(model),
        anneal_steps=100,
        window=10,
        max_steps=300,
        progress=False,
    )
    beta = [min(1, 0.01 + 0.99 * s / 100) for s in range(history.num_steps)]
    offset = [loss - 1000 * b for loss, b in zip(history.losses, beta, strict=True)]
    assert max(abs(x) for x in offset) < 5  # the rest of the loss is a KL near zero
    # The loss rises during annealing, yet its windows do not decay the rate.
    assert history.lrs[:100] == [1e-2] * 100 and history.anneal_steps == 100


def test_no_global_side_effects(data):
    pyro.param("unrelated", torch.ones(()))
    validation, dtype = is_validation_enabled(), torch.get_default_dtype()
    after, losses = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        history = train_guide(normal_model, AutoNormal(normal_model), data, max_steps=5,
                              progress=False)  # fmt: skip
        after.append(torch.rand(4))
        losses.append(history.losses)
        for name in ("AutoNormal.locs.mu", "AutoNormal.scales.mu"):
            del pyro.get_param_store()[name]
    # Reseeding inside would make the states after training equal; they follow the caller's.
    assert not torch.equal(after[0], after[1]) and losses[0] != losses[1]
    assert "unrelated" in pyro.get_param_store()
    assert is_validation_enabled() == validation
    assert torch.get_default_dtype() == dtype


@pytest.mark.parametrize(
    "option, match",
    [
        ({"num_particles": 0}, "num_particles must be an integer >= 1"),
        ({"num_particles": 2.0}, "num_particles must be an integer"),
        ({"num_particles": True}, "num_particles must be an integer >= 1, got True"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1"),
        ({"window": 1}, "window must be an integer >= 2"),
        ({"anneal_steps": -1}, "anneal_steps must be an integer >= 0"),
        ({"lr": 0.0}, "lr must be a positive finite number"),
        ({"lr": math.inf}, "lr must be a positive finite number"),
        ({"lr": math.nan}, "lr must be a positive finite number, got nan"),
        ({"min_lr": -1.0}, "min_lr must be a positive finite number"),
        ({"min_lr": 0.1}, "min_lr must be at most lr"),
        ({"decay": 1.0}, r"decay must be in \(0, 1\)"),
        ({"decay": 0}, r"decay must be in \(0, 1\)"),
        ({"clip_norm": 0.0}, "clip_norm must be a positive finite number or None, got 0.0"),
    ],
)
def test_validation(option, match):
    with pytest.raises(ValueError, match=match):
        train_guide(noop, noop, **option)


def test_type_checks_and_no_parameters():
    with pytest.raises(TypeError, match="loss must be a Pyro ELBO"):
        train_guide(noop, noop, loss="elbo")
    with pytest.raises(TypeError, match="callback must be callable"):
        train_guide(noop, noop, callback=3)

    def model():
        pyro.factor("f", torch.tensor(0.0))

    with pytest.raises(ValueError, match="neither the guide nor the model has any parameters"):
        train_guide(model, noop, progress=False)


def test_guide_training_is_frozen():
    history = GuideTraining([1.0, 2.0, math.nan], [0.1, 0.2, 0.3], [1e-2] * 3, 3, "max_steps",
                            1, window=2)  # fmt: skip
    assert history.final_loss == 1.5
    with pytest.raises(AttributeError):
        history.stopped = "converged"


def test_plate_nesting_is_inferred_for_vectorised_particles():
    y = torch.randn(3, 4, dtype=torch.float64)

    def model(y):
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(y.new_zeros(()), 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    guide = AutoNormal(model)
    assert _plate_nesting(model, guide, y) == 2
    history = train_guide(model, guide, y, num_particles=8, max_steps=20, progress=False)
    assert history.nonfinite_steps == 0 and guide.locs.z.shape == (3, 4)
