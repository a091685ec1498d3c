"""headwise bench distributed: the summary from rows, and one small real run on 2 gloo processes."""

import pytest

from headwise.bench import distributed as bench


def _row(method, P, rank, peak, sent=0.0, ms=10.0):
    return dict(method=method, P=P, rank=rank, N=64, local_len=64 // P, ms=ms, ms_median=ms, first_ms=ms,
                peak_mib=peak, sent_mib=sent, received_mib=sent, messages=2)


def test_summary_takes_the_worst_rank_and_compares_memory_with_p1():
    rows = [_row("ring", 1, 0, 8.0), _row("ring", 2, 0, 4.0, 1.0, ms=12.0), _row("ring", 2, 1, 5.0, 1.5, ms=11.0),
            _row("single", 1, 0, 10.0), _row("heads", 2, 0, 6.0), _row("heads", 2, 1, 5.0)]
    s = {(r["method"], r["P"]): r for r in bench.summarize(rows)}
    assert s["ring", 2]["ms"] == 12.0 and s["ring", 2]["peak_mib"] == 5.0 and s["ring", 2]["sent_mib"] == 1.5
    assert s["ring", 2]["mem_vs_p1"] == pytest.approx(5.0 / 8.0)
    assert s["heads", 2]["mem_vs_p1"] == pytest.approx(6.0 / 10.0)  # no heads at P=1: against single
    assert s["ring", 2]["ideal"] == 0.5
    assert "| ring | 2 |" in bench.to_markdown(rows)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="methods"):
        bench.run(ranks=(1,), methods=("rings",))
    with pytest.raises(ValueError, match="n must be"):
        bench.run(ranks=(1,), n=0)


def test_two_ranks_report_the_ring_volume():
    n, H, D = 64, 2, 8
    rows = bench.run(ranks=(2,), n=n, heads=H, head_dim=D, methods=("ring", "heads"), repeats=1, timeout=240)
    ring = [r for r in rows if r["method"] == "ring"]
    assert sorted(r["rank"] for r in ring) == [0, 1]
    kv_bytes = 2 * H * (n // 2) * D * 4  # k and v shards, fp32
    for r in ring:  # forward: k/v one hop; backward: k/v one hop, then dk/dv back to their owner
        assert r["sent_mib"] * 2**20 == pytest.approx(3 * kv_bytes)
        assert r["ms"] > 0 and r["peak_mib"] is not None
    heads = [r for r in rows if r["method"] == "heads"]
    assert len(heads) == 2 and all(r["sent_mib"] > 0 for r in heads)
