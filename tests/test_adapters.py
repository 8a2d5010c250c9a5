"""fastbus.adapters with the real blinker, pyee and pypubsub.

Each adapter must deliver to fastbus handlers while the library's own receivers,
registered directly on the wrapped object, keep receiving every message exactly
once and in the call shape they had before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import itertools
import pathlib
import re

import blinker
import pytest
from pubsub import pub
from pubsub.core import Publisher
from pubsub.core.topicexc import TopicNameError
from pyee import EventEmitter
from pyee.asyncio import AsyncIOEventEmitter

from fastbus import InProcessBus, MessageBus, Subscription
from fastbus.adapters import BlinkerBus, PubSubBus, PyeeBus, wrap

_names = itertools.count()


def unique(prefix: str) -> str:
    """A topic name no other test uses (blinker and pypubsub have global defaults)."""
    return f"{prefix}{next(_names)}"


# -- the contract every adapter keeps ------------------------------------------------


def make_blinker() -> tuple[BlinkerBus, object]:
    ns = blinker.Namespace()
    return BlinkerBus(ns), ns


def make_pyee() -> tuple[PyeeBus, object]:
    em = EventEmitter()
    return PyeeBus(em), em


def make_pubsub() -> tuple[PubSubBus, object]:
    p = Publisher()
    return PubSubBus(p), p


ADAPTERS = [make_blinker, make_pyee, make_pubsub]


@pytest.mark.parametrize("make", ADAPTERS, ids=["blinker", "pyee", "pypubsub"])
class TestContract:
    def test_is_a_message_bus(self, make):
        bus, _ = make()
        assert isinstance(bus, MessageBus)
        sub = bus.subscribe("t", lambda m: None)
        assert isinstance(sub, Subscription) and sub.active

    def test_delivers_every_message_once_in_order(self, make):
        bus, _ = make()
        got: list[object] = []
        bus.subscribe("t", got.append)
        for i in range(100):
            bus.publish("t", {"n": i})
        assert got == [{"n": i} for i in range(100)]

    def test_lambda_handler_survives_gc(self, make):
        bus, _ = make()
        got: list[object] = []
        bus.subscribe("t", lambda m: got.append(m))  # nobody else holds the lambda
        gc.collect()
        bus.publish("t", 1)
        assert got == [1]

    def test_unsubscribe_and_context_manager(self, make):
        bus, _ = make()
        got: list[object] = []
        sub = bus.subscribe("t", got.append)
        bus.publish("t", 1)
        sub.unsubscribe()
        sub.unsubscribe()  # idempotent
        bus.publish("t", 2)
        with bus.subscribe("t", got.append):
            bus.publish("t", 3)
        bus.publish("t", 4)
        assert got == [1, 3]

    def test_same_handler_twice_is_two_subscriptions(self, make):
        bus, _ = make()
        got: list[object] = []
        first = bus.subscribe("t", got.append)
        bus.subscribe("t", got.append)
        bus.publish("t", "a")
        first.unsubscribe()
        bus.publish("t", "b")
        assert got == ["a", "a", "b"]

    def test_topics_are_separate(self, make):
        bus, _ = make()
        a: list[object] = []
        b: list[object] = []
        bus.subscribe("a", a.append)
        bus.subscribe("b", b.append)
        bus.publish("a", 1)
        bus.publish("b", 2)
        assert (a, b) == ([1], [2])

    def test_bad_arguments(self, make):
        bus, _ = make()
        with pytest.raises(TypeError, match="topic must be a str"):
            bus.publish(1, "m")
        with pytest.raises(TypeError, match="handler must be callable"):
            bus.subscribe("t", 42)

    def test_async_handler_refused_where_not_awaited(self, make):
        bus, _ = make()

        async def handler(m):
            pass

        with pytest.raises(TypeError, match="coroutine handler"):
            bus.subscribe("t", handler)

    def test_wrap_recognises_the_library_object(self, make):
        bus, obj = make()
        wrapped = wrap(obj)
        assert type(wrapped) is type(bus)
        got: list[object] = []
        wrapped.subscribe("w", got.append)
        bus.publish("w", "x")  # the same underlying object
        assert got == ["x"]


# -- blinker -------------------------------------------------------------------------


class TestBlinker:
    def test_legacy_receiver_keeps_its_call_shape(self):
        ns = blinker.Namespace()
        legacy_calls: list[tuple] = []

        def legacy(sender, **kwargs):  # connected the usual way: weak, any sender
            legacy_calls.append((sender, kwargs))

        ns.signal("orders").connect(legacy)
        bus = BlinkerBus(ns)
        got: list[object] = []
        bus.subscribe("orders", got.append)
        for i in range(10):
            bus.publish("orders", i)
        assert got == list(range(10))
        assert legacy_calls == [(i, {}) for i in range(10)]  # as signal.send(i) calls it

    def test_keyword_mode_with_a_fixed_sender(self):
        ns = blinker.Namespace()
        app = object()
        legacy_calls: list[tuple] = []

        def legacy(sender, **kwargs):
            legacy_calls.append((sender, kwargs))

        ns.signal("saved").connect(legacy, sender=app)  # only sends from app
        bus = BlinkerBus(ns, keyword="message", sender=app)
        got: list[object] = []
        bus.subscribe("saved", got.append)
        bus.publish("saved", "m1")
        bus.publish("saved", "m2")
        assert got == ["m1", "m2"]
        assert legacy_calls == [(app, {"message": "m1"}), (app, {"message": "m2"})]

    def test_direct_sends_reach_fastbus_handlers(self):
        ns = blinker.Namespace()
        got: list[object] = []
        BlinkerBus(ns).subscribe("t", got.append)
        ns.signal("t").send("direct", extra=1)
        kw: list[object] = []
        BlinkerBus(ns, keyword="message").subscribe("t", kw.append)
        ns.signal("t").send("sender", message="m")
        ns.signal("t").send("no-keyword")
        assert got == ["direct", "sender", "no-keyword"]
        assert kw == ["m", "no-keyword"]

    def test_default_namespace_is_blinkers(self):
        topic = unique("blinker-default-")
        got: list[object] = []
        blinker.signal(topic).connect(got.append, weak=False)
        with BlinkerBus().subscribe(topic, got.append):
            BlinkerBus().publish(topic, "x")
        blinker.signal(topic).disconnect(got.append)
        assert got == ["x", "x"]

    def test_handler_error_propagates_like_signal_send(self):
        ns = blinker.Namespace()
        bus = BlinkerBus(ns)

        def boom(m):
            raise ValueError(f"bad {m}")

        bus.subscribe("t", boom)
        with pytest.raises(ValueError, match="bad 1"):
            bus.publish("t", 1)
        with pytest.raises(ValueError, match="bad 2"):
            ns.signal("t").send(2)

    def test_publish_returns_sends_result(self):
        ns = blinker.Namespace()
        bus = BlinkerBus(ns)
        bus.subscribe("t", lambda m: m * 2)
        assert [result for _, result in bus.publish("t", 21)] == [42]

    def test_options_are_checked(self):
        with pytest.raises(TypeError, match=r"blinker\.Namespace"):
            BlinkerBus(EventEmitter())
        with pytest.raises(ValueError, match="identifier"):
            BlinkerBus(blinker.Namespace(), keyword="not valid")
        with pytest.raises(ValueError, match="only used with keyword"):
            BlinkerBus(blinker.Namespace(), sender="app")


# -- pyee ----------------------------------------------------------------------------


class TestPyee:
    def test_legacy_listener_and_direct_emits(self):
        em = EventEmitter()
        legacy: list[tuple] = []
        em.on("orders", lambda *args: legacy.append(args))
        bus = PyeeBus(em)
        got: list[object] = []
        bus.subscribe("orders", got.append)
        for i in range(10):
            assert bus.publish("orders", i) is True
        em.emit("orders", "direct", "extra-arg")
        em.emit("orders")
        assert legacy == [*((i,) for i in range(10)), ("direct", "extra-arg"), ()]
        assert got == [*range(10), "direct", None]

    def test_legacy_listener_receives_every_message_once(self):
        em = EventEmitter()
        legacy: list[object] = []
        em.on("orders", legacy.append)
        bus = PyeeBus(em)
        bus.subscribe("orders", lambda m: None)
        for i in range(10):
            bus.publish("orders", i)
        assert legacy == list(range(10))

    def test_unsubscribe_removes_the_listener(self):
        em = EventEmitter()
        bus = PyeeBus(em)
        sub = bus.subscribe("t", lambda m: None)
        assert len(em.listeners("t")) == 1
        sub.unsubscribe()
        assert em.listeners("t") == []
        assert bus.publish("t", 1) is False  # nobody listens: emit's own answer

    def test_unsubscribe_after_remove_all_listeners(self):
        em = EventEmitter()
        sub = PyeeBus(em).subscribe("t", lambda m: None)
        em.remove_all_listeners("t")
        sub.unsubscribe()  # no error

    def test_plain_emitter_propagates_handler_errors(self):
        em = EventEmitter()
        after: list[object] = []

        def boom(m):
            raise ValueError("boom")

        bus = PyeeBus(em)
        bus.subscribe("t", boom)
        em.on("t", after.append)
        with pytest.raises(ValueError, match="boom"):
            bus.publish("t", 1)
        assert after == []  # pyee stops at the first error

    def test_asyncio_emitter_turns_errors_into_error_events(self):
        em = AsyncIOEventEmitter()
        errors: list[BaseException] = []
        after: list[object] = []

        def boom(m):
            raise ValueError("boom")

        bus = PyeeBus(em)
        bus.subscribe("t", boom)
        em.on("t", after.append)
        with pytest.raises(ValueError, match="boom"):  # no 'error' listener: raised
            bus.publish("t", 1)
        em.on("error", errors.append)
        bus.publish("t", 2)
        assert [str(e) for e in errors] == ["boom"]
        assert after == [2]  # with an 'error' listener the others still run

    def test_asyncio_emitter_runs_coroutine_handlers(self):
        async def main():
            em = AsyncIOEventEmitter()
            bus = PyeeBus(em)
            assert bus.runs_coroutines
            got: list[object] = []
            errors: list[BaseException] = []
            em.on("error", errors.append)

            async def handler(m):
                await asyncio.sleep(0)
                if m == "bad":
                    raise RuntimeError("async boom")
                got.append(m)

            bus.subscribe("t", handler)
            bus.publish("t", "a")
            bus.publish("t", "bad")
            await em.wait_for_complete()
            return got, errors

        got, errors = asyncio.run(main())
        assert got == ["a"]
        assert [str(e) for e in errors] == ["async boom"]

    def test_executor_emitter_refuses_coroutine_handlers(self):
        from pyee.executor import ExecutorEventEmitter

        async def handler(m):
            pass

        with ExecutorEventEmitter() as em:
            bus = PyeeBus(em)
            assert not bus.runs_coroutines
            with pytest.raises(TypeError, match="AsyncIOEventEmitter"):
                bus.subscribe("t", handler)

    def test_publish_error_event_without_listener_raises(self):
        with pytest.raises(ValueError, match="x"):
            PyeeBus().publish("error", ValueError("x"))

    def test_options_are_checked(self):
        with pytest.raises(TypeError, match="pyee EventEmitter"):
            PyeeBus(blinker.Namespace())
        assert isinstance(PyeeBus().emitter, EventEmitter)


# -- pypubsub ------------------------------------------------------------------------


class TestPubSub:
    def test_legacy_listener_keeps_its_call_shape(self):
        p = Publisher()
        legacy: list[object] = []

        def on_order(msg):  # the kind of listener existing code has
            legacy.append(msg)

        p.subscribe(on_order, "orders")
        bus = PubSubBus(p)
        got: list[object] = []
        bus.subscribe("orders", got.append)
        for i in range(10):
            bus.publish("orders", i)
        p.sendMessage("orders", msg="direct")
        assert legacy == [*range(10), "direct"]
        assert got == [*range(10), "direct"]

    def test_dots_are_hierarchical(self):
        p = Publisher()
        bus = PubSubBus(p)
        parent: list[object] = []
        child: list[object] = []
        bus.subscribe("orders", parent.append)
        bus.subscribe("orders.created", child.append)
        bus.publish("orders.created", 1)
        bus.publish("orders", 2)
        assert child == [1]
        assert parent == [1, 2]  # a parent topic also gets its subtopics' messages

    def test_subtopic_first_then_parent(self):
        p = Publisher()
        bus = PubSubBus(p)
        got: list[object] = []
        bus.subscribe("a.b.c", got.append)
        bus.subscribe("a", got.append)
        bus.publish("a.b.c", "deep")
        assert got == ["deep", "deep"]

    def test_existing_spec_with_another_argument(self):
        p = Publisher()

        def on_data(data):
            pass

        p.subscribe(on_data, "legacy")  # fixes the topic's spec to (data)
        with pytest.raises(TypeError, match=r'arguments \(\'data\',\).*arg="data"'):
            PubSubBus(p).publish("legacy", 1)
        got: list[object] = []
        bus = PubSubBus(p, arg="data")
        bus.subscribe("legacy", got.append)
        bus.publish("legacy", 1)
        assert got == [1]

    def test_spec_with_more_required_arguments_is_refused(self):
        p = Publisher()

        def on_pair(msg, other):
            pass

        p.subscribe(on_pair, "pair")
        with pytest.raises(TypeError, match=r"requires the arguments \('other',\)"):
            PubSubBus(p).subscribe("pair", print)

    def test_topic_names_follow_pypubsub_rules(self):
        bus = PubSubBus(Publisher())
        with pytest.raises(TopicNameError):
            bus.publish("a..b", 1)
        with pytest.raises(TopicNameError):
            bus.subscribe("_private", print)
        got: list[object] = []
        bus.subscribe("orders/created", got.append)  # only dots have a meaning
        bus.publish("orders/created", 1)
        assert got == [1]

    def test_unsubscribe_drops_the_strong_reference(self):
        p = Publisher()
        bus = PubSubBus(p)
        sub = bus.subscribe("t", lambda m: None)
        topic = p.getTopicMgr().getTopic("t")
        assert topic.getNumListeners() == 1
        sub.unsubscribe()
        assert topic.getNumListeners() == 0
        assert bus._listeners == {}

    def test_handler_error_propagates_like_send_message(self):
        p = Publisher()
        bus = PubSubBus(p)

        def boom(m):
            raise ValueError("boom")

        bus.subscribe("t", boom)
        with pytest.raises(ValueError, match="boom"):
            bus.publish("t", 1)

    def test_listener_exception_handler_is_respected(self):
        p = Publisher()
        caught: list[str] = []
        p.setListenerExcHandler(lambda listener_id, topic_obj: caught.append(listener_id))
        bus = PubSubBus(p)
        got: list[object] = []
        bus.subscribe("t", lambda m: 1 / 0)
        bus.subscribe("t", got.append)
        bus.publish("t", 1)
        assert len(caught) == 1 and got == [1]

    def test_default_publisher_is_pub(self):
        topic = unique("pubdefault")
        got: list[object] = []

        def legacy(msg):
            got.append(("legacy", msg))

        pub.subscribe(legacy, topic)
        bus = wrap(pub)
        assert isinstance(bus, PubSubBus) and bus.publisher is pub.getDefaultPublisher()
        with bus.subscribe(topic, lambda m: got.append(("fastbus", m))):
            PubSubBus().publish(topic, 7)
        pub.unsubscribe(legacy, topic)
        assert sorted(got) == [("fastbus", 7), ("legacy", 7)]

    def test_options_are_checked(self):
        with pytest.raises(TypeError, match="pypubsub Publisher"):
            PubSubBus(EventEmitter())
        with pytest.raises(ValueError, match="identifier"):
            PubSubBus(arg="_x")


# -- wrap ------------------------------------------------------------------------------


class TestWrap:
    def test_a_message_bus_is_returned_as_is(self):
        bus = InProcessBus()
        assert wrap(bus) is bus

    def test_any_object_with_fitting_methods(self):
        class Duck:
            def publish(self, topic, message, *, key=None):
                pass

            def subscribe(self, topic, handler):
                pass

        duck = Duck()
        assert wrap(duck) is duck

    def test_methods_that_do_not_fit_are_refused(self):
        class Odd:
            def publish(self, message):
                pass

            def subscribe(self, topic, handler):
                pass

        with pytest.raises(TypeError, match=r"cannot wrap .*Odd"):
            wrap(Odd())

    def test_asyncio_emitter_subclass(self):
        assert isinstance(wrap(AsyncIOEventEmitter()), PyeeBus)

    def test_single_blinker_signal_is_explained(self):
        with pytest.raises(TypeError, match=r"wrap the blinker\.Namespace"):
            wrap(blinker.Signal())

    def test_unknown_kinds_name_the_accepted_ones(self):
        with pytest.raises(TypeError) as info:
            wrap(object())
        text = str(info.value)
        for kind in ("publish(topic, message)", "blinker.Namespace", "pyee EventEmitter",
                     "pypubsub Publisher"):
            assert kind in text

    def test_adapters_load_lazily(self):
        import fastbus.adapters as adapters

        with pytest.raises(AttributeError, match="no attribute 'Nope'"):
            _ = adapters.Nope


# -- docs/adapters.md ---------------------------------------------------------------------

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adapters.md"
EXAMPLE = re.compile(r"```python\n(.*?)```\s*```text\n(.*?)```", re.DOTALL)


def doc_examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(DOC.read_text())


def test_docs_have_examples():
    assert len(doc_examples()) >= 6


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_docs_examples(index):
    """Every ```python block of docs/adapters.md prints the ```text block after it."""
    code, expected = doc_examples()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/adapters.md example {index}", "exec"), {"__name__": "doc"})
    assert out.getvalue() == expected
