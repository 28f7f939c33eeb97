from spikelm.data.splits import BBC_TOPICS, SplitRule


def test_split_is_deterministic_and_close_to_fractions():
    keys = [f"doc{i}" for i in range(20000)]
    splits = [BBC_TOPICS.split_of(k) for k in keys]
    assert splits == [BBC_TOPICS.split_of(k) for k in keys]
    for name, frac in (("dev", 0.1), ("test", 0.1), ("train", 0.8)):
        assert abs(splits.count(name) / len(keys) - frac) < 0.01
    other = SplitRule(salt="other")
    assert [other.split_of(k) for k in keys[:200]] != splits[:200]


def test_bad_fractions():
    import pytest

    with pytest.raises(ValueError, match="fractions"):
        SplitRule(salt="x", dev=0.6, test=0.5)
