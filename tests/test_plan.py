"""The step plan (gpu_mlp.plan) and the sink protocol (gpu_mlp.updates): one object holds
what a step does, and every way of giving it -- a number, an optimizer, a plan; train_step,
fit, a checkpoint -- takes the same steps, bit for bit."""

from __future__ import annotations

import doctest
import json
import warnings
import zipfile

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import checkpoint, optim, plan as plan_module, training, updates
from gpu_mlp.plan import StepPlan, StepScalars
from gpu_mlp.privacy import DP

SIZES = [6, 8, 3]


def problem(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SIZES[0])), rng.integers(0, SIZES[-1], n)


def new_net():
    return gpu_mlp.MLP(SIZES, loss="softmax_cross_entropy", device="cpu", dtype="float64",
                       seed=1)


def params(net):
    return [a.copy() for pair in net.params for a in pair]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


RULES = {"sgd": lambda: 0.1, "adam": lambda: optim.Adam(1e-2),
         "momentum": lambda: optim.SGD(0.05, momentum=0.9, weight_decay=1e-3)}


def test_the_module_docstring_runs():
    assert doctest.testmod(plan_module).failed == 0


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("private", [False, True])
def test_a_plan_steps_as_its_parts_do(rule, private):
    X, Y = problem()
    make_dp = (lambda: DP(1.0, 0.7, seed=3)) if private else (lambda: None)
    by_parts, by_plan = new_net(), new_net()
    rule_a, dp_a = RULES[rule](), make_dp()
    plan = StepPlan(RULES[rule](), make_dp())
    for first in range(0, 40, 10):
        J_a = by_parts.train_step(X[first:first + 10], Y[first:first + 10], rule_a, dp=dp_a)
        J_b = by_plan.train_step(X[first:first + 10], Y[first:first + 10], plan)
        assert float(J_a) == float(J_b)
    assert same(params(by_parts), params(by_plan))
    if private:
        assert plan.dp.steps == dp_a.steps == 4


@pytest.mark.parametrize("rule", RULES)
def test_fit_by_plan_is_fit_by_arguments(rule):
    X, Y = problem()
    by_args, by_plan = new_net(), new_net()
    r = RULES[rule]()
    kwargs = {"lr": r} if isinstance(r, float) else {"optimizer": r}
    h_a = by_args.fit(X, Y, epochs=2, batch_size=16, verbose=False, dp=DP(1.0, 0.5, seed=1),
                      **kwargs)
    h_b = by_plan.fit(X, Y, epochs=2, batch_size=16, verbose=False,
                      plan=StepPlan(RULES[rule](), DP(1.0, 0.5, seed=1)))
    for name in ("lr", "train_loss", "epsilon"):  # all but the seconds
        assert getattr(h_a, name) == getattr(h_b, name), name
    assert same(params(by_args), params(by_plan))


def test_a_number_is_plain_sgd():
    plan = StepPlan(0.1)
    assert plan.plain and plan.optimizer is None and plan.lr == 0.1 == plan.last_lr
    assert isinstance(plan.rule, optim.SGD) and plan.rule.lr == 0.1
    assert plan.rule.momentum == 0 and plan.rule.weight_decay == 0
    sink = plan.sink(new_net(), rows=4)
    assert isinstance(sink, updates.Apply) and sink.kernels is None and sink.scratch is None
    assert sink.keep == (1.0, 1.0) and sink.lr == 0.1
    # its rule is there to read: a rate or decay set on it, which the steps never saw,
    # was taken silently
    assert repr(plan.rule).startswith("SGD(") and plan.rule.state_dict()["type"] == "SGD"
    changes = [lambda rule: setattr(rule, "lr", 0.5),
               lambda rule: setattr(rule, "weight_decay", 0.5),
               lambda rule: rule.load_state_dict(optim.SGD(0.5).state_dict()),
               lambda rule: rule.scale_momentum(2.0)]
    for change in changes:
        with pytest.raises(AttributeError, match="a StepPlan of a number steps at that "
                                                 "rate, without weight decay"):
            change(plan.rule)
    assert (plan.lr, plan.rule.lr, plan.rule.weight_decay) == (0.1, 0.1, 0.0)
    assert type(plan.rule) is optim.SGD
    adam = optim.Adam()
    assert StepPlan(adam).optimizer is adam and not StepPlan(adam).plain


def test_a_plain_plan_steps_any_net_an_optimizers_one():
    X, Y = problem()
    plain, adam = StepPlan(0.1), StepPlan(optim.Adam())
    for net in (new_net(), new_net()):
        net.train_step(X, Y, plain)
    net = new_net()
    net.train_step(X, Y, adam)
    with pytest.raises(ValueError, match="bound to another network"):
        new_net().train_step(X, Y, adam)


def test_bad_plans_are_refused_with_the_old_messages():
    with pytest.raises(TypeError, match="lr must be a number or a gpu_mlp.optim optimizer"):
        StepPlan("fast")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        StepPlan(-1.0)
    with pytest.raises(TypeError, match="lr must be a number, got True"):
        StepPlan(True)
    with pytest.raises(TypeError, match="dp must be a gpu_mlp.privacy.DP"):
        StepPlan(0.1, dp="private")
    with pytest.raises(TypeError, match="comm must be a gpu_mlp.distributed.Communicator "
                                        "or an mpi4py communicator, got 'world'"):
        StepPlan(0.1, comm="world")  # refused when made, not at its first step
    with pytest.raises(ValueError, match="holds its own dp and comm"):
        StepPlan.of(StepPlan(0.1), dp=DP(1.0, 1.0))
    plan = StepPlan(0.1)
    assert StepPlan.of(plan) is plan
    X, Y = problem()
    with pytest.raises(ValueError, match="give plan or lr, dp, not both"):
        new_net().fit(X, Y, lr=0.1, dp=DP(1.0, 1.0), plan=plan, verbose=False)
    with pytest.raises(TypeError, match="plan must be a gpu_mlp.plan.StepPlan"):
        new_net().fit(X, Y, plan=0.1, verbose=False)


def test_a_plan_says_what_depends_on_dp_and_communication():
    plain, private = StepPlan(0.1), StepPlan(optim.Adam(1e-2), DP(1.0, 0.5, delta=1e-5))
    assert not plain.private and not plain.parallel and private.private
    class World:  # what an mpi4py communicator offers, as far as a plan looks
        Get_rank = Get_size = Allreduce = None
    assert StepPlan(0.1, comm=World()).parallel
    assert plain.divisor(16, 40) is None and private.divisor(16, 40) == 16
    assert private.divisor(64, 40) == 40  # every row, every step: the expected batch is n
    assert plain.epsilon(0.4) is None and plain.epsilon(0.4, steps=1) is None
    assert private.epsilon(0.4, steps=3) == private.dp.epsilon(0.4, steps=3)
    # what the ranks of a data-parallel fit compare: the keys and values fit always sent
    assert plain.config() == {"lr": 0.1, "optimizer": None, "optimizer_steps": None,
                              "dp": None}
    # the DP's seed, which may be secret, by a digest: a mismatch is printed
    seed = private.config()["dp"].pop("seed")
    assert private.config()["dp"]["seed"] == seed and str(private.dp.seed) not in seed
    assert private.config() == {"lr": None, "optimizer": repr(private.rule),
                                "optimizer_steps": 0, "dp": {**private.dp.state_dict(),
                                                             "seed": seed}}
    assert StepPlan(0.1, DP(1.0, 0.5, seed=2)).config()["dp"]["seed"] != seed


@pytest.mark.parametrize("rule", RULES)
def test_a_plan_snapshot_restores_the_optimizer_and_the_dp(rule):
    X, Y = problem()
    net, plan = new_net(), StepPlan(RULES[rule](), DP(1.0, 0.5, seed=2))
    net.train_step(X[:10], Y[:10], plan)
    snapshot, steps = plan.snapshot(), plan.dp.steps
    state = None if plan.plain else plan.optimizer.state_dict()
    for first in (10, 20):
        net.train_step(X[first:first + 10], Y[first:first + 10], plan)
    plan.restore(snapshot)
    assert plan.dp.steps == steps == 1
    if plan.plain:
        assert snapshot[0] is None
    else:
        after = plan.optimizer.state_dict()
        assert after["steps"] == state["steps"] == 1 and state["state"]
        assert after["state"].keys() == state["state"].keys()
        for name, pairs in state["state"].items():
            assert same([a for pair in after["state"][name] for a in pair],
                        [a for pair in pairs for a in pair]), name


def test_a_resumed_plan_must_have_taken_the_runs_steps():
    plan = StepPlan(optim.Adam(), DP(1.0, 0.5))
    plan.check_resumed(0, 5)
    with pytest.raises(ValueError, match=r"resume: the optimizer has taken 0 steps, but the "
                                         r"run to continue took 10 \(2 epochs of 5\); pass "
                                         r"the optimizer saved with it "
                                         r"\(gpu_mlp.checkpoint.read\(path\).optimizer\)"):
        plan.check_resumed(2, 5)
    plan.optimizer._steps = 10
    with pytest.raises(ValueError, match="resume: the dp has taken 0 steps"):
        plan.check_resumed(2, 5)
    plan.dp.steps = 10
    plan.check_resumed(2, 5)
    StepPlan(0.1).check_resumed(2, 5)  # plain SGD without DP: nothing counts steps


def _meta(path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        with z.open("meta.npy") as f:
            return json.loads(str(np.lib.format.read_array(f))), names


def test_a_checkpoint_of_a_plan_is_one_of_its_parts(tmp_path):
    X, Y = problem()
    net = new_net()
    plain = StepPlan(0.1, DP(1.0, 0.5, seed=0))
    with warnings.catch_warnings():  # one noisy epoch's loss may rise: not the point here
        warnings.simplefilter("ignore", training.TrainingWarning)
        history = net.fit(X, Y, epochs=1, batch_size=16, verbose=False, plan=plain)
    checkpoint.save(net, tmp_path / "plan.npz", history=history, plan=plain)
    checkpoint.save(net, tmp_path / "parts.npz", history=history, dp=plain.dp)
    meta_plan, names_plan = _meta(tmp_path / "plan.npz")
    meta_parts, names_parts = _meta(tmp_path / "parts.npz")
    assert "optimizer" not in meta_plan  # plain SGD saves as it always did: no optimizer
    assert meta_plan == meta_parts and names_plan == names_parts

    opt = optim.Adam(1e-2)
    adam = StepPlan(opt)
    net.fit(X, Y, epochs=1, batch_size=16, verbose=False, plan=adam)
    net.save(tmp_path / "adam.npz", plan=adam)
    stored = checkpoint.read(tmp_path / "adam.npz", device="cpu")
    assert stored.optimizer.state_dict()["steps"] == opt.steps and stored.dp is None
    with pytest.raises(ValueError, match="give plan or optimizer and dp, not both"):
        checkpoint.save(net, tmp_path / "x.npz", plan=adam, optimizer=opt)


def test_checkpoints_rebuild_the_registered_models():
    assert {"MLP": gpu_mlp.MLP, "Network": gpu_mlp.Network} == {
        name: cls for name, (cls, _) in checkpoint.MODELS.items()}


# --- the sink protocol ----------------------------------------------------------------------

class _Recorder(updates.Rule):
    def __init__(self):
        self.calls, self.finished = [], 0

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        self.calls.append(k)

    def gradient(self, k, G, noise=None):
        self.calls.append(("G", k))

    def finish(self):
        self.finished += 1


class _Passing(updates.Stage):
    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        self.downstream(k, T_rows, X_rows, ones, noise)


def test_a_stage_finishes_its_downstream_once():
    end = _Recorder()
    chain = _Passing(_Passing(end))
    for k in (1, 0):
        chain(k, None, None, None)
    chain.finish()
    assert end.calls == [1, 0] and end.finished == 1
    assert chain.keeps_factors and not end.keeps_factors


def test_every_sink_declares_the_protocol():
    for kind in (updates.Apply, updates.WriteGradients, updates.EachLayer, updates.Stage,
                 gpu_mlp.privacy._Private, gpu_mlp.distributed._Stage):
        assert isinstance(kind.keeps_factors, bool) and callable(kind.finish), kind


def test_optimizer_kinds_name_their_options():
    assert list(optim.KINDS) == ["sgd", "momentum", "adam", "adamw"]
    for opt, kind in ((optim.SGD(0.1), "sgd"), (optim.SGD(0.1, momentum=0.5), "momentum"),
                      (optim.Adam(), "adam"), (optim.AdamW(), "adamw")):
        assert opt.kind == kind and isinstance(opt, optim.KINDS[kind].cls)
        assert list(opt.settings()) == ["lr", *optim.KINDS[kind].options]
    assert optim.Adam(betas=(0.8, 0.9)).settings()["betas"] == (0.8, 0.9)


# --- StepScalars: a step's scalars on the device, written only when they go stale ---------

def _written(monkeypatch):
    writes = []
    real = plan_module.write
    monkeypatch.setattr(plan_module, "write",
                        lambda target, value: (writes.append(target.shape), real(target, value)))
    return writes


def _stepped(scalars, plan, noise_std=0.0):
    """One step as the engine takes it: prepare, select (here: the row, as the kernel
    picks it), then the counts on both sides."""
    scalars.prepare(plan, noise_std)
    row = int(scalars.counters[0] - scalars.counters[2])
    scalars.values[...] = scalars.table[min(max(row, 0), scalars.table.shape[0] - 1)]
    scalars.advance()
    plan.count_step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_scalars_hold_the_hosts_numbers_of_each_step(dtype):
    opt = optim.AdamW(1e-2, schedule=optim.Cosine(4, warmup=1), eps_placement="uncorrected")
    plan, scalars = StepPlan(opt, DP(1.0, 1.0)), StepScalars(np, dtype)
    for step in range(6):
        want = plan.step_values(step, 0.25)
        scalars.prepare(plan, 0.25)
        values = scalars.table[step - scalars._first]
        assert [values[StepScalars.COLUMNS.index(name)] for name in want] == \
            [dtype(v) for v in want.values()]
        _stepped(scalars, plan, 0.25)
    assert want["step_size"] == opt.lr_at(5) / (1 - 0.9 ** 6)  # in double, then rounded
    assert want["noise_lr"] == -opt.lr_at(5) * 0.25


def test_a_steady_step_writes_nothing_and_a_change_rewrites_what_went_stale(monkeypatch):
    writes = _written(monkeypatch)
    opt, dp = optim.Adam(1e-2, schedule=optim.Step(1, 0.5)), DP(1.0, 1.0)
    plan, scalars = StepPlan(opt, dp), StepScalars(np, np.float32)
    _stepped(scalars, plan)
    assert writes == [(StepScalars.WINDOW, len(StepScalars.COLUMNS)), (3,)]  # table, counters
    writes.clear()
    for _ in range(5):
        _stepped(scalars, plan)
    assert writes == [] and tuple(scalars.counters[:2]) == (6, 6)
    dp.steps = 2  # by hand (or a checkpoint): the counters only
    _stepped(scalars, plan)
    assert writes == [(3,)] and tuple(scalars.counters[:2]) == (7, 3)
    writes.clear()
    opt.lr = 5e-3  # another setting: the table again
    _stepped(scalars, plan)
    assert writes == [(StepScalars.WINDOW, len(StepScalars.COLUMNS)), (3,)]
    assert scalars.values[StepScalars.COLUMNS.index("lr")] == np.float32(5e-3 * 0.5 ** 7)


def test_a_window_runs_out_and_is_refilled(monkeypatch):
    monkeypatch.setattr(StepScalars, "WINDOW", 3)
    writes = _written(monkeypatch)
    opt = optim.SGD(1e-2, schedule=optim.Step(1, 0.5))
    plan, scalars = StepPlan(opt), StepScalars(np, np.float64)
    for step in range(7):
        _stepped(scalars, plan)
        assert scalars.values[StepScalars.COLUMNS.index("alpha")] == -1e-2 * 0.5 ** step
    assert writes.count((3, len(StepScalars.COLUMNS))) == 3  # steps 0, 3 and 6


def test_plain_sgd_has_one_row_whatever_the_step(monkeypatch):
    writes = _written(monkeypatch)
    scalars = StepScalars(np, np.float32)
    for _ in range(4):
        _stepped(scalars, StepPlan(0.1))  # a new plan each step, as train_step makes
    assert writes == [(1, len(StepScalars.COLUMNS)), (3,)]
    _stepped(scalars, StepPlan(0.2))  # another rate: one row again, no recapture needed
    assert scalars.values[StepScalars.COLUMNS.index("alpha")] == np.float32(-0.2)


@pytest.mark.parametrize("weight, penalty, error, match", [
    ("1", 0.0, TypeError, "weight must be a number"),
    (1.0, True, TypeError, "penalty must be a number"),
    (1.0, float("nan"), ValueError, "penalty"),
    (1e39, 0.0, ValueError, "weight"),  # inf in float32
])
def test_a_loss_tally_refuses_what_its_kernel_could_not_add(weight, penalty, error, match):
    from gpu_mlp.plan import LossTally

    net = gpu_mlp.MLP([2, 3, 1], loss="squared", device="cpu", dtype="float32", seed=0)
    with pytest.raises(error, match=match):
        LossTally(net, weight, penalty)


def test_a_loss_tally_sums_each_steps_rows_times_its_loss_and_the_weights_squares():
    from gpu_mlp.plan import LossTally

    net = gpu_mlp.MLP([3, 4, 2], loss="squared", device="cpu", dtype="float64", seed=0)
    tally = LossTally(net, weight=0.5, penalty=0.25)
    rng = np.random.default_rng(0)
    expected = 0.0
    for rows in (5, 3, 5):
        X, Y = rng.standard_normal((rows, 3)), rng.standard_normal((rows, 2))
        squares = sum(float((W ** 2).sum()) for W, _ in net.params)  # before the update
        J = float(net._step(X, Y, StepPlan(0.1), False, tally=tally))
        expected += 0.5 * rows * J + 0.25 * squares
    assert tally.total() == pytest.approx(expected, rel=1e-13)
    tally.reset()
    assert tally.total() == 0.0
