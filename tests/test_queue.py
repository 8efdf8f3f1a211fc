"""app/semantic/queue.py: queries wait in arrival order, share model runs, and are refused only when
the measured drain rate says they would wait past the deadline; background work yields to queries.

The model is a stand-in that returns "vec:<text>" per text and can be held at a gate, so a test decides
what is waiting when the model frees up. A clock that never moves makes the wait estimates exact."""

from __future__ import annotations

import threading

import pytest

from app.semantic.queue import UNIT_OVERHEAD, ModelQueue, QueueFull
from support import wait_until


class Model:
    """encode() records each run and, while the gate is closed, holds the run in flight."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.runs: list[tuple[str, list[str]]] = []
        self.entered = threading.Event()

    def encode(self, texts, batch_size, kind="passage"):
        self.runs.append((kind, list(texts)))
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return [f"vec:{text}" for text in texts]


def measured(queue: ModelQueue, seconds_per_unit: float) -> None:
    """As if a full batch of queries had been timed at this rate: admission goes by the deadline alone."""
    queue.seconds_per_unit, queue.batched = seconds_per_unit, queue.max_batch


def hold_first_run(queue: ModelQueue, model: Model) -> threading.Thread:
    """One query in flight, held at the model's gate, so that later queries queue behind it."""
    model.gate.clear()
    first = threading.Thread(target=queue.encode_query, args=("q0",))
    first.start()
    assert model.entered.wait(30), "the first run never reached the model"
    return first


def enqueue(queue: ModelQueue, texts: list[str], answers: dict) -> list[threading.Thread]:
    """Each text submitted from its own thread, strictly one after the other (each in line before the next)."""
    threads = []
    base = queue.depth()
    for n, text in enumerate(texts, start=base + 1):
        def ask(text=text):
            try:
                answers[text] = queue.encode_query(text)
            except QueueFull as exc:
                answers[text] = exc
        thread = threading.Thread(target=ask)
        thread.start()
        threads.append(thread)
        wait_until(lambda: queue.depth() == n or text in answers, f"{text} to be in line")
    return threads


def test_waiting_queries_are_encoded_together_in_arrival_order(tmp_path):
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=3, deadline_s=60)
    measured(queue, 0.001)
    first = hold_first_run(queue, model)
    answers: dict = {}
    threads = enqueue(queue, [f"q{i}" for i in range(1, 8)], answers)
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    # Oldest first, up to max_batch per run: no query overtakes one that arrived before it.
    assert [texts for _, texts in model.runs] == [["q0"], ["q1", "q2", "q3"], ["q4", "q5", "q6"], ["q7"]]
    assert queue.runs == 4 and queue.batched == queue.max_batch + 8


def test_each_caller_of_a_batch_gets_its_own_vector(tmp_path):
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=16, deadline_s=60)
    first = hold_first_run(queue, model)
    answers: dict = {}
    texts = [f"שאילתה {i}" for i in range(8)]
    threads = enqueue(queue, texts, answers)
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert model.runs[1] == ("query", texts)  # the eight distinct queries shared one run
    assert answers == {text: f"vec:{text}" for text in texts}


def test_a_query_is_refused_only_when_its_expected_wait_passes_the_deadline():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=1, deadline_s=1.05, clock=lambda: 0.0)
    measured(queue, 0.1 / (3 + UNIT_OVERHEAD))  # a 3-character query takes 0.1 s
    model.gate.clear()
    first = threading.Thread(target=queue.encode_query, args=("q00",))
    first.start()
    assert model.entered.wait(30)  # in flight, 0.1 s left on the still clock
    answers: dict = {}
    # Queries 1-9 in line expect 0.1 + 0.1 * n s, at most 1.0 s: all admitted. The tenth would wait 1.1 s.
    threads = enqueue(queue, [f"q{i:02d}" for i in range(1, 10)], answers)
    with pytest.raises(QueueFull) as refused:
        queue.encode_query("q10")
    assert refused.value.expected_wait == pytest.approx(1.1) and refused.value.retry_after == 1
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert answers == {f"q{i:02d}": f"vec:q{i:02d}" for i in range(1, 10)}  # every admitted query answered


def test_the_early_check_refuses_only_when_even_the_shortest_query_would_pass_the_deadline():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=1, deadline_s=1.05, clock=lambda: 0.0)
    measured(queue, 0.1 / (3 + UNIT_OVERHEAD))  # a 3-character query takes 0.1 s, an empty one 0.057 s
    assert queue.refusal() is None and queue._thread is None  # a look only: no model thread for it
    model.gate.clear()
    first = threading.Thread(target=queue.encode_query, args=("q00",))
    first.start()
    assert model.entered.wait(30)  # in flight, 0.1 s left on the still clock
    answers: dict = {}
    threads = enqueue(queue, [f"q{i:02d}" for i in range(1, 9)], answers)  # 0.8 s in line
    assert queue.refusal() is None  # 0.957 s for the shortest query: it would be admitted
    with pytest.raises(QueueFull):
        queue.encode_query("q09-long")  # 0.1 + 0.8 + 0.171: a longer one is not
    threads += enqueue(queue, ["q09"], answers)  # 1.0 s: now even an empty query would wait 1.057 s
    refused = queue.refusal()
    assert isinstance(refused, QueueFull) and refused.expected_wait == pytest.approx(1.0 + 0.4 / 7)
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert answers == {f"q{i:02d}": f"vec:q{i:02d}" for i in range(1, 10)}


def test_before_its_first_timed_run_a_queue_takes_one_batch_and_says_why_it_refuses_more():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=2, deadline_s=60)
    first = hold_first_run(queue, model)  # in flight, not yet timed: no drain rate
    answers: dict = {}
    threads = enqueue(queue, ["a", "b"], answers)
    with pytest.raises(QueueFull) as refused:
        queue.encode_query("c")
    assert refused.value.unmeasured_waiting == 2
    assert "not measured yet" in refused.value.reason(60) and "0.0 s" not in refused.value.reason(60)
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert answers == {"a": "vec:a", "b": "vec:b"}


def test_until_a_full_batch_is_timed_a_queue_takes_one_batch_however_fast_its_first_run():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=2, deadline_s=60)
    assert queue.encode_query("a") == "vec:a"  # timed: a drain rate, from one query on an idle model
    model.entered.clear()
    first = hold_first_run(queue, model)
    answers: dict = {}
    threads = enqueue(queue, ["b", "c"], answers)
    with pytest.raises(QueueFull) as refused:
        queue.encode_query("d")
    assert refused.value.unmeasured_waiting == 2
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert answers == {"b": "vec:b", "c": "vec:c"}
    assert queue.encode_query("e") == "vec:e"  # two batches timed (three queries): the rate decides now


def test_a_query_counts_for_the_tokens_its_encoder_reads():
    # The encoder's count decides, not the characters: a 4-character text of many rare pieces is long.
    tokens = {"מילה " * 100: 200, "ארוך": 300}
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=4, deadline_s=1.0, clock=lambda: 0.0,
                       measure=lambda text, kind: tokens.get(text, 2))
    measured(queue, 0.004)
    first = hold_first_run(queue, model)  # "q0": 2 + UNIT_OVERHEAD units in flight, 24 ms
    answers: dict = {}
    long = "מילה " * 100  # 204 units: about 0.8 s
    threads = enqueue(queue, [long], answers)
    for refused in ("ארוך", long):  # either would end past the deadline
        with pytest.raises(QueueFull):
            queue.encode_query(refused)
    threads += enqueue(queue, ["קצר", "עוד"], answers)  # short ones still fit: 6 units each
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert set(answers) == {long, "קצר", "עוד"}


def test_retry_after_is_the_time_the_queue_needs_to_drain_to_the_deadline():
    queue = ModelQueue(Model().encode, None, max_batch=1, deadline_s=1.5)
    assert queue.retry_after(1.6) == 1 and queue.retry_after(4.2) == 3 and queue.retry_after(0.1) == 1


def test_background_work_waits_while_a_query_waits():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=4, deadline_s=60)
    first = hold_first_run(queue, model)
    background: dict = {}
    worker = threading.Thread(target=lambda: background.update(v=queue.encode_background(["passage"], 8)))
    worker.start()
    wait_until(lambda: len(queue._background) == 1, "the background job to be queued")
    answers: dict = {}
    threads = enqueue(queue, ["late query"], answers)
    model.gate.set()
    for thread in (first, worker, *threads):
        thread.join(30)
    assert [kind for kind, _ in model.runs] == ["query", "query", "passage"], model.runs
    assert background["v"] == ["vec:passage"] and answers == {"late query": ["vec:late query"][0]}


def test_background_work_runs_in_pieces_and_a_query_passes_between_them():
    # Three passages of 100 tokens: each its own piece (BACKGROUND_PIECE_UNITS), so a query that arrives
    # while the first is encoded waits for that piece only, not for the whole batch.
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=4, deadline_s=60,
                       measure=lambda text, kind: 100 if text.startswith("passage") else 2)
    model.gate.clear()
    background: dict = {}
    passages = ["passage 1", "passage 2", "passage 3"]
    worker = threading.Thread(target=lambda: background.update(v=queue.encode_background(passages, 8)))
    worker.start()
    assert model.entered.wait(30), "the first piece never reached the model"
    answers: dict = {}
    threads = enqueue(queue, ["query"], answers)
    model.gate.set()
    for thread in (worker, *threads):
        thread.join(30)
    assert model.runs == [("passage", ["passage 1"]), ("query", ["query"]), ("passage", ["passage 2"]),
                          ("passage", ["passage 3"])], model.runs
    assert background["v"] == [f"vec:{p}" for p in passages] and answers == {"query": "vec:query"}


def test_short_passages_share_a_piece_up_to_the_bound():
    model = Model()
    queue = ModelQueue(model.encode, None, max_batch=4, deadline_s=60, measure=lambda text, kind: 40)
    texts = [f"p{i}" for i in range(7)]  # 44 units each: two fit in 128, a third would not
    assert queue.encode_background(texts, 8) == [f"vec:{t}" for t in texts]
    assert [len(batch) for _, batch in model.runs] == [2, 2, 2, 1]


def test_a_failed_piece_fails_its_background_job_and_the_queue_goes_on():
    def encode(texts, batch_size, kind="passage"):
        if "bad" in texts:
            raise RuntimeError("the runtime failed on 'bad'")
        return [f"vec:{text}" for text in texts]

    queue = ModelQueue(encode, None, max_batch=4, deadline_s=60, measure=lambda text, kind: 100)
    with pytest.raises(RuntimeError, match="'bad'"):
        queue.encode_background(["good", "bad", "never"], 8)
    assert queue.encode_background(["again"], 8) == ["vec:again"]
    assert queue.encode_query("q") == "vec:q"


def test_a_failed_run_fails_its_callers_and_the_queue_goes_on():
    calls = []

    def encode(texts, batch_size, kind="passage"):
        calls.append(list(texts))
        if len(calls) == 1:
            raise RuntimeError("the runtime failed")
        return [f"vec:{text}" for text in texts]

    queue = ModelQueue(encode, None, max_batch=4, deadline_s=60)
    with pytest.raises(RuntimeError, match="the runtime failed"):
        queue.encode_query("first")
    assert queue.encode_query("second") == "vec:second"


def test_a_run_that_fails_fails_only_the_query_the_runtime_cannot_encode():
    runs = []

    def encode(texts, batch_size, kind="passage"):
        runs.append(list(texts))
        if "bad" in texts:
            raise RuntimeError("the runtime failed on 'bad'")
        return [f"vec:{text}" for text in texts]

    model = Model()
    queue = ModelQueue(lambda *a, **k: model.encode(*a, **k) if a[0] == ["q0"] else encode(*a, **k), None,
                       max_batch=8, deadline_s=60)
    first = hold_first_run(queue, model)
    answers: dict = {}

    def ask(text):
        try:
            answers[text] = queue.encode_query(text)
        except RuntimeError as exc:
            answers[text] = exc

    threads = []
    for n, text in enumerate(["good", "bad", "fine"], start=1):
        threads.append(threading.Thread(target=ask, args=(text,)))
        threads[-1].start()
        wait_until(lambda n=n: queue.depth() == n, f"{text} to be in line")
    model.gate.set()
    for thread in (first, *threads):
        thread.join(30)
    assert answers["good"] == "vec:good" and answers["fine"] == "vec:fine", answers
    assert isinstance(answers["bad"], RuntimeError)
    assert runs[0] == ["good", "bad", "fine"] and sorted(runs[1:]) == [["bad"], ["fine"], ["good"]]


def test_queries_that_arrive_while_the_model_thread_waits_for_a_slot_join_its_run(tmp_path):
    # Another worker's run holds the instance's one slot; q1 wakes this worker's model thread, which waits
    # for the slot; q2 and q3 arrive meanwhile. All three go in the run that the slot starts, not q1 alone.
    from app.semantic.slots import Slots

    slots = Slots(tmp_path, 1)
    other_worker = slots.acquire()
    model = Model()
    queue = ModelQueue(model.encode, slots, max_batch=4, deadline_s=60)
    answers: dict = {}
    threads = [threading.Thread(target=lambda: answers.update(q1=queue.encode_query("q1")))]
    threads[0].start()
    wait_until(slots.others_waiting, "the model thread to wait for the slot")
    threads += enqueue(queue, ["q2", "q3"], answers)
    other_worker.release()
    for thread in threads:
        thread.join(30)
    assert model.runs == [("query", ["q1", "q2", "q3"])], model.runs
    assert answers == {"q1": "vec:q1", "q2": "vec:q2", "q3": "vec:q3"}


def test_a_model_thread_that_just_ran_lets_another_workers_waiting_thread_go_first(tmp_path):
    from app.semantic.slots import Slots

    slots = Slots(tmp_path, 1)
    assert not slots.others_waiting()
    announced = threading.Event()
    leave = threading.Event()

    def waiter():
        with slots.waiting():
            announced.set()
            leave.wait(30)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert announced.wait(30)
    assert slots.others_waiting()
    leave.set()
    thread.join(30)
    assert not slots.others_waiting()
