"""Steering specs and math, without the engine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import grpc
import pytest
import torch
from featurelens.server.interp.sae import SAE_CLASSES, SaeConfig
from featurelens.server.interp.steering import parse_interventions, parse_vector, steering_delta
from featurelens.server.validation import ApiError
from featurelens.v1 import featurelens_pb2 as pb

D_IN, D_SAE = 16, 32


def make_sae(seed: int = 0):
    torch.manual_seed(seed)
    sae = SAE_CLASSES["standard"](SaeConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE,
                                            hook_name="blocks.3.hook_resid_post"))
    w_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN), dim=-1)
    sae.W_dec.data, sae.W_enc.data = w_dec, w_dec.T.clone()
    sae.b_enc.data = torch.full((D_SAE,), -0.1)
    return sae


SAES = {3: SimpleNamespace(d_sae=D_SAE, sae_id="toy")}


def parse(*items, vectors=None):
    return parse_interventions(list(items), num_layers=8, saes=SAES, vectors=vectors or {}, max_interventions=4,
                               max_strength=50.0)


def iv(**kw):
    return pb.SteeringIntervention(**kw)


def test_parse_plain_data():
    specs = parse(iv(layer=3, feature_id=5, op=pb.STEERING_OP_NUDGE, strength=2.0,
                     positions=pb.TOKEN_POSITIONS_GENERATED, condition=pb.SteeringCondition(feature_id=1, threshold=0.5)),
                  iv(layer=6, vector_id="v1", op=pb.STEERING_OP_ADD, strength=1.0), vectors={"v1": D_IN})
    assert specs[0] == {"layer": 3, "op": "nudge", "strength": 2.0, "positions": "generated", "norm": False,
                        "feature": 5, "cond": [1, 0.5]}
    assert specs[1]["vector"] == "v1" and specs[1]["positions"] == "all"


@pytest.mark.parametrize("item, field, code", [
    (iv(layer=9, feature_id=1, op=pb.STEERING_OP_NUDGE), "steering[0].layer", grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=D_SAE, op=pb.STEERING_OP_NUDGE), "steering[0].feature_id",
     grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=1, op=pb.STEERING_OP_NUDGE, strength=51), "steering[0].strength",
     grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=1, op=pb.STEERING_OP_NUDGE, strength=math.nan), "steering[0].strength",
     grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=1), "steering[0].op", grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=1, op=99), "steering[0].op", grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, op=pb.STEERING_OP_ADD, feature_id=1), "steering[0].vector_id", grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, op=pb.STEERING_OP_ADD, vector_id="nope"), "steering[0].vector_id",
     grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, op=pb.STEERING_OP_PIN, vector_id="v1"), "steering[0].feature_id", grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=5, feature_id=1, op=pb.STEERING_OP_ABLATE), "steering[0].layer", grpc.StatusCode.FAILED_PRECONDITION),
    (iv(layer=3, feature_id=1, op=pb.STEERING_OP_SCALE, positions=7), "steering[0].positions",
     grpc.StatusCode.INVALID_ARGUMENT),
    (iv(layer=3, feature_id=1, op=pb.STEERING_OP_SCALE, condition=pb.SteeringCondition(feature_id=D_SAE)),
     "steering[0].condition.feature_id", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_parse_rejects_naming_the_field(item, field, code):
    with pytest.raises(ApiError) as info:
        parse(item)
    assert info.value.code == code
    assert info.value.message.startswith(field + ":"), info.value.message


def test_too_many_interventions():
    with pytest.raises(ApiError) as info:
        parse(*[iv(layer=3, feature_id=1, op=pb.STEERING_OP_NUDGE)] * 5)
    assert info.value.message.startswith("steering:")


def test_parse_vector_checks_length_and_finiteness():
    assert parse_vector("v1", [0.5] * D_IN, D_IN).shape == (D_IN,)
    for vector_id, values, field in (("v1", [0.0] * 3, "values"), ("Bad Id", [0.0] * D_IN, "vector_id"),
                                     ("v1", [math.inf] + [0.0] * (D_IN - 1), "values")):
        with pytest.raises(ApiError) as info:
            parse_vector(vector_id, values, D_IN)
        assert info.value.message.startswith(field + ":")


def spec(op, feature=None, strength=0.0, positions="all", norm=False, cond=None, vector=None):
    s = {"layer": 3, "op": op, "strength": strength, "positions": positions, "norm": norm}
    if feature is not None:
        s["feature"] = feature
    if vector is not None:
        s["vector"] = vector
    if cond is not None:
        s["cond"] = cond
    return s


def test_ops_match_their_definitions():
    sae = make_sae()
    x = torch.randn(5, D_IN) * 3
    pos = torch.arange(5)
    a = sae.encode(x)
    d = sae.W_dec[4]
    cases = {
        "nudge": 2.5 * d / d.norm(),
        "pin": (1.5 - a[:, 4:5]) * d,
        "scale": (3.0 - 1.0) * a[:, 4:5] * d,
        "ablate": -a[:, 4:5] * d,
    }
    strengths = {"nudge": 2.5, "pin": 1.5, "scale": 3.0, "ablate": 0.0}
    for op, expected in cases.items():
        delta = steering_delta(x, pos, 5, [spec(op, 4, strengths[op])], sae, {})
        torch.testing.assert_close(delta, expected.expand_as(x))


def test_pin_sets_the_feature_and_ablate_removes_it():
    sae = make_sae()
    x = torch.randn(6, D_IN) * 3
    f = int(sae.encode(x).sum(0).argmax())  # a feature that fires
    fired = sae.encode(x)[:, f] > 0
    pinned = x + steering_delta(x, torch.arange(6), 6, [spec("pin", f, 2.0)], sae, {})
    # PIN swaps the feature's contribution a·d for 2·d; where it fired, it then reads ≈ 2 (the dictionary is
    # near-orthogonal, so other features leak in only a little).
    assert fired.sum() >= 2
    assert torch.allclose(sae.encode(pinned)[fired, f], torch.full((int(fired.sum()),), 2.0), atol=0.35)
    ablated = x + steering_delta(x, torch.arange(6), 6, [spec("ablate", f)], sae, {})
    assert sae.encode(ablated)[:, f].abs().max() < sae.encode(x)[:, f].max() * 0.5


def test_positions_condition_and_norm():
    sae = make_sae()
    x = torch.randn(6, D_IN) * 3
    pos = torch.arange(6)
    gen_only = steering_delta(x, pos, 4, [spec("nudge", 1, 1.0, positions="generated")], sae, {})
    assert gen_only[:4].abs().sum() == 0 and gen_only[4:].abs().sum() > 0
    prompt_only = steering_delta(x, pos, 4, [spec("nudge", 1, 1.0, positions="prompt")], sae, {})
    assert prompt_only[4:].abs().sum() == 0 and prompt_only[:4].abs().sum() > 0
    # A condition no row meets leaves everything untouched: the rows plus its delta are the rows, bit for bit.
    untouched = steering_delta(x, pos, 6, [spec("nudge", 1, 1.0, cond=[2, 1e9])], sae, {})
    assert torch.equal(x + untouched, x) and untouched.abs().sum() == 0
    acts = sae.encode(x)[:, 2]
    cond = steering_delta(x, pos, 6, [spec("nudge", 1, 1.0, cond=[2, float(acts.median())])], sae, {})
    assert torch.equal(cond.abs().sum(-1) > 0, acts > acts.median())
    kept = x + steering_delta(x, pos, 6, [spec("nudge", 1, 5.0, norm=True)], sae, {})
    torch.testing.assert_close(kept.norm(dim=-1), x.norm(dim=-1))


def test_add_vector_and_composition():
    sae = make_sae()
    x = torch.randn(3, D_IN)
    v = torch.randn(D_IN)
    both = steering_delta(x, torch.arange(3), 3, [spec("add", strength=2.0, vector="v"), spec("nudge", 0, 1.0)],
                          sae, {"v": v})
    one = steering_delta(x, torch.arange(3), 3, [spec("add", strength=2.0, vector="v")], sae, {"v": v})
    two = steering_delta(x, torch.arange(3), 3, [spec("nudge", 0, 1.0)], sae, {"v": v})
    torch.testing.assert_close(both, one + two)
    torch.testing.assert_close(one, (2.0 * v).expand_as(x))


def test_compiled_mode_refuses_interpretability():
    """Hooks do not fire in compiled mode: the request is refused, never answered without its features."""
    from featurelens.server.config import Settings
    from featurelens.server.interp_plan import plan_interpretability

    engine = SimpleNamespace(interpretability_available=False, saes={}, vectors={}, risk_probe=None,
                             shape=SimpleNamespace(num_layers=8))
    for request in (pb.GenerateRequest(text="x", interpretability=pb.InterpretabilityOptions(score_risk=True)),
                    pb.GenerateRequest(text="x", steering=[iv(layer=3, feature_id=1, op=pb.STEERING_OP_NUDGE)]),
                    pb.GenerateRequest(text="x", interpretability=pb.InterpretabilityOptions(
                        features=[pb.FeatureSelection(layer=3)]))):
        with pytest.raises(ApiError) as info:
            plan_interpretability(request, engine, Settings())
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.message.startswith("interpretability:")
    plain = plan_interpretability(pb.GenerateRequest(text="x"), engine, Settings())
    assert not plain.active


def test_stacked_requests_steer_as_they_would_alone():
    """The worker stacks the rows of every request with the same steering list and passes each row's prompt
    length: each row's change must equal what its request alone would get."""
    sae = make_sae()
    specs = [spec("nudge", 1, 2.0, positions="generated"), spec("scale", 2, 0.5), spec("ablate", 3, cond=[4, 0.1])]
    a, b = torch.randn(5, D_IN) * 3, torch.randn(2, D_IN) * 3
    pos_a, pos_b = torch.arange(5), torch.tensor([9, 10])
    alone = [steering_delta(a, pos_a, 3, specs, sae, {}), steering_delta(b, pos_b, 10, specs, sae, {})]
    stacked = steering_delta(torch.cat([a, b]), torch.cat([pos_a, pos_b]), torch.tensor([3] * 5 + [10] * 2), specs,
                             sae, {})
    torch.testing.assert_close(stacked, torch.cat(alone))
    assert stacked[:3, :].abs().sum() > 0  # prompt rows of a: only SCALE/ABLATE, NUDGE is generated-only
    assert alone[1][0].abs().sum() > 0 and not torch.equal(alone[1][0], alone[1][1])


def test_steering_salt_follows_vector_content_and_the_prompt_boundary():
    """KV blocks are shared only by requests that would compute the same entries. Added vectors are named by
    their worker key (namespace, id and content digest), so a re-registered vector is another name."""
    from featurelens.server.interp_plan import InterpPlan
    from featurelens.server.state import StoredVector, worker_key

    old, new = worker_key("ns", StoredVector("v", (1.0, 2.0))), worker_key("ns", StoredVector("v", (1.0, 3.0)))
    assert old != new and old.startswith("ns/v@")

    def plan(positions: str, vector: str) -> InterpPlan:
        return InterpPlan(steer=[{"layer": 3, "op": "add", "strength": 2.0, "positions": positions, "norm": False,
                                  "vector": vector}])

    assert InterpPlan().cache_salt(10) is None
    assert plan("all", old).cache_salt(10) != plan("all", new).cache_salt(10)
    # steering every position: the boundary does not matter, multi-turn prefixes are shared
    assert plan("all", old).cache_salt(10) == plan("all", old).cache_salt(25)
    # steering only generated (or only prompt) positions: the boundary is part of the namespace
    assert plan("generated", old).cache_salt(10) != plan("generated", old).cache_salt(25)
    assert plan("generated", old).cache_salt(10) != plan("all", old).cache_salt(10)
