"""The schedulers by hand: small cases whose steps can be worked out on paper."""

from __future__ import annotations

from sim.request import Request
from sim.scheduler import ContinuousScheduler, PaddedBatchScheduler


def drive(s, reqs, now=0.0):
    for r in reqs:
        s.add(r)
    steps = []
    while (step := s.schedule(now)) is not None:
        steps.append(step)
        now += 1.0
        s.postprocess(step, now)
    return steps


def test_continuous_prefill_then_decode_token_accounting():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=100, kv_capacity=1000)
    a, b = Request(0, 0.0, 10, 3), Request(1, 0.0, 20, 1)
    steps = drive(s, [a, b])
    # One prefill pass for both (the first token each), then 2 decode steps for a.
    assert [(st.prefill_seqs, st.decode_seqs) for st in steps] == [(2, 0), (0, 1), (0, 1)]
    assert steps[1].decode_context == 10 and steps[2].decode_context == 11
    assert b.first_token_at == b.finished_at == 1.0
    assert a.first_token_at == 1.0 and a.finished_at == 3.0 and a.generated == 3
    assert s.kv_used == 0 and not s.running


def test_padded_layout_prices_the_longest_and_the_cache_copies():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=100, kv_capacity=1000, padded=True)
    short, long = Request(0, 0.0, 10, 2), Request(1, 0.0, 30, 4)
    steps = drive(s, [short, long])
    assert steps[0].prefill_len == 30  # padded to the longest prompt
    assert steps[1].decode_context == 2 * 30  # both rows attend over the longest cache
    # short finishes after step 1: the next step first compacts the cache (1 row of 31 tokens).
    assert steps[2].reshuffle_tokens == 31 and steps[2].decode_context == 31


def test_paged_layout_prices_the_mean():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=100, kv_capacity=1000)
    steps = drive(s, [Request(0, 0.0, 10, 2), Request(1, 0.0, 30, 4)])
    assert steps[0].prefill_len == 20 and steps[1].decode_context == 40
    assert all(st.reshuffle_tokens == 0 for st in steps)


def test_chunked_prefill_shares_the_token_budget_with_decodes():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=16, kv_capacity=1000, chunked_prefill=True)
    a = Request(0, 0.0, 8, 5)
    s.add(a)
    s.postprocess(s.schedule(0.0), 1.0)  # a's whole prompt, first token
    b = Request(1, 1.0, 40, 2)
    s.add(b)
    step = s.schedule(1.0)
    assert step.decode_seqs == 1 and step.prefill == [(b, 15)]  # 16 tokens: 1 decode + 15 of b's prompt


def test_preemption_recomputes_prompt_and_generated_tokens():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=100, kv_capacity=25)
    a, b = Request(0, 0.0, 10, 8), Request(1, 0.0, 10, 8)
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule(0.0), 1.0)  # both prefilled: 20 tokens cached
    for t in range(2, 5):
        s.postprocess(s.schedule(t), t + 1.0)  # 3 decode steps: 26 tokens would not fit
    # Three decode steps in, 20 + 2 * 3 tokens would overflow 25: b, the newest, goes back.
    assert b.preemptions == 1 and s.waiting[0] is b and b.generated == 3
    assert b.prefill_need == 13  # its prompt and the tokens it had made are recomputed


def test_static_batch_keeps_finished_rows_until_the_longest_is_done():
    s = PaddedBatchScheduler(max_batch_size=2, kv_capacity=1000, max_wait_s=None)
    steps = drive(s, [Request(0, 0.0, 5, 2), Request(1, 0.0, 9, 4)])
    assert [st.decode_seqs for st in steps[1:]] == [2, 2, 2]  # the short row is computed to the end
    assert steps[0].prefill_len == 9


def test_prefix_caching_skips_a_computed_prefix_but_always_computes_the_last_token():
    s = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=1000, kv_capacity=10_000, prefix_caching=True)
    first = Request(0, 0.0, 300, 1, prefix_id=7, prefix_tokens=200)
    assert [st.prefill[0][1] for st in drive(s, [first])] == [300]  # nothing cached yet
    same, other = Request(1, 0.0, 300, 1, prefix_id=7, prefix_tokens=200), Request(2, 0.0, 300, 1, prefix_id=8,
                                                                                  prefix_tokens=200)
    step = drive(s, [same, other])[0]
    assert [(r.id, tokens) for r, tokens in step.prefill] == [(1, 100), (2, 300)]
    whole = Request(3, 0.0, 201, 1, prefix_id=7, prefix_tokens=200)  # all but its last token cached
    assert drive(s, [whole])[0].prefill[0][1] == 1
    assert [r.prefix_cached_tokens for r in (first, same, other, whole)] == [0, 200, 0, 200]
    plain = ContinuousScheduler(max_num_seqs=4, max_batched_tokens=1000, kv_capacity=10_000)
    drive(plain, [Request(0, 0.0, 300, 1, prefix_id=7, prefix_tokens=200)])
    assert drive(plain, [Request(1, 0.0, 300, 1, prefix_id=7, prefix_tokens=200)])[0].prefill[0][1] == 300
