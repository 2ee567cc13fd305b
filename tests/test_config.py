"""DHSAConfig validation: one clear message naming the value."""

import pytest

from dhsa_export import DHSAConfig, DHSAError


@pytest.mark.parametrize("density", [0, 1.5, -0.1, float("nan")])
def test_bad_density(density):
    with pytest.raises(DHSAError, match="density"):
        DHSAConfig(density=density)


@pytest.mark.parametrize("field", ["q_block", "k_block"])
@pytest.mark.parametrize("value", [0, -32])
def test_bad_block(field, value):
    with pytest.raises(DHSAError, match=f"{field} {value}"):
        DHSAConfig(**{field: value})


def test_bad_pattern_and_budget():
    with pytest.raises(DHSAError, match="unknown pattern 'nope'"):
        DHSAConfig(pattern="nope")
    cfg = DHSAConfig()
    assert cfg.budget_blocks(4096) == 16 and cfg.budget_tokens(4096) == 512
    assert cfg.budget_blocks(10) == 1
    assert DHSAConfig(density=1.0).budget_blocks(70) == 3


def test_chunk_score_is_validated_and_round_trips_through_the_route_op():
    from dhsa_export.onnx.registry import config_from_route_attributes, route_attributes

    assert DHSAConfig().chunk_score == "mass" and DHSAConfig().max_chunk == DHSAConfig().k_block
    with pytest.raises(DHSAError, match="unknown chunk score 'max'"):
        DHSAConfig(chunk_score="max")
    for score in ("mass", "mean"):  # the Route op takes both (native mass score since the dynamic export)
        attrs = route_attributes(DHSAConfig(pattern="dynamic", chunk_score=score), 8, 2)
        assert attrs["chunk_score"] == score
        assert config_from_route_attributes(attrs, 8, 2).chunk_score == score
    assert route_attributes(DHSAConfig(), 8, 2)["pattern"] == "vslash"  # other patterns unaffected
