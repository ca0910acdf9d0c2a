"""Serving metrics: histogram buckets hold their upper bound, and the Prometheus text is cumulative,
labelled and escaped."""

from __future__ import annotations

import re

import pytest

from jaxfire.metrics import EngineStats, Histogram, prometheus


def test_histogram_buckets_hold_their_upper_bound():
    h = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 1.0, 3.0):
        h.observe(value)
    assert h.counts == [2, 1, 1, 1] and h.count == 5 and h.sum == pytest.approx(4.065)
    with pytest.raises(ValueError, match="increase strictly"):
        Histogram((0.1, 0.1))


def test_prometheus_text():
    def hist(*values):
        h = Histogram((0.01, 0.1))
        for v in values:
            h.observe(v)
        return h

    stats = EngineStats(slots=4, running=2, waiting=3, finished={"length": 5, "eos": 1}, prompt_tokens=6144,
                        generated_tokens=300, steps={"decode_steps": 50}, time_to_first_token=hist(0.05, 0.2),
                        inter_token_latency=hist(0.005, 0.006, 0.02), e2e_latency=hist(), queue_time=hist(0.0),
                        kv_pages_total=200, kv_pages_used=50, kv_pages_cached=30, prefix_cache_queries=4096,
                        prefix_cache_hits=1024, preemptions=7)
    text = prometheus(stats, 'mix"tral')
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = 'model_name="mix\\"tral"'
    assert samples[f"jaxfire:num_requests_running{{{label}}}"] == 2
    assert samples[f"jaxfire:num_requests_waiting{{{label}}}"] == 3
    assert samples[f'jaxfire:request_success_total{{{label},finished_reason="length"}}'] == 5
    assert samples[f"jaxfire:prompt_tokens_total{{{label}}}"] == 6144
    assert samples[f"jaxfire:engine_decode_steps_total{{{label}}}"] == 50
    assert samples[f"jaxfire:kv_cache_usage_perc{{{label}}}"] == 0.25
    assert samples[f"jaxfire:prefix_cache_queries_total{{{label}}}"] == 4096
    assert samples[f"jaxfire:prefix_cache_hits_total{{{label}}}"] == 1024
    assert samples[f"jaxfire:num_preemptions_total{{{label}}}"] == 7
    buckets = [samples[f'jaxfire:time_per_output_token_seconds_bucket{{{label},le="{le}"}}']
               for le in ("0.01", "0.1", "+Inf")]
    assert buckets == [2, 3, 3]  # cumulative
    assert samples[f"jaxfire:time_per_output_token_seconds_count{{{label}}}"] == 3
    assert samples[f"jaxfire:time_to_first_token_seconds_sum{{{label}}}"] == pytest.approx(0.25)
    assert samples[f"jaxfire:e2e_request_latency_seconds_count{{{label}}}"] == 0
    # every family declared once, before its samples
    declared = re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M)
    assert len(declared) == len({name for name, _ in declared}) == 15
