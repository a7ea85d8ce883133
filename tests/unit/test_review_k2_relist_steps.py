"""A large list goes to the store in steps that let the event loop run (xDS, the CA, the readiness probe), while the
listeners (the xDS server, hence the agents) only ever see the whole of it.

client-go's reflector replaces its store in its own goroutine (tools/cache/reflector.go syncWith -> store.Replace);
here the store lives on the event loop, so the apply is cut into steps instead. Measured with 10,000 pods
(controller.synthetic) before the change: one store.update of 2.0 s (new pods) or 0.23 s (unchanged pods, the usual
relist after a 410) holding the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from controller.model import ObjectKey
from controller.monitoring import ControllerMetrics
from controller.sources.kube import RESOURCES, KubeSource, source_id, validate
from controller.store import ConfigStore, Contribution
from controller.translate import Delta, Translator
from tests.support.fake_kube import namespace, pod
from tests.support.xds_controller import wait_for

PODS = next(r for r in RESOURCES if r.kind == "Pod")
N = 120


def allow_policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/demo/sa/{name}"]}}]}],
        },
    }


def contribution(obj: dict[str, Any]) -> tuple[str, Contribution]:
    parsed = validate(obj["kind"], obj)
    assert parsed is not None and not parsed.errors, parsed
    return source_id(obj["kind"], obj), parsed


def pods(n: int, version: str = "1") -> dict[str, Contribution | None]:
    out: dict[str, Contribution | None] = {}
    for i in range(n):
        obj = pod(f"web-{i}", f"10.1.{i // 250}.{i % 250 + 1}")
        obj["metadata"]["labels"]["version"] = version
        sid, c = contribution(obj)
        out[sid] = c
    return out


def new_store() -> ConfigStore:
    store = ConfigStore(Translator(), ControllerMetrics())
    store.update(dict([contribution(namespace("demo")), contribution(allow_policy("old"))]))
    return store


def state(store: ConfigStore) -> tuple[dict[str, Any], dict[str, Any]]:
    t = store.translator
    return t.addresses(), t.authorizations()


async def test_a_stepped_update_lets_the_loop_run_and_publishes_once() -> None:
    """Between steps other callbacks run (fails before: no update_in_steps, one update held the loop throughout);
    the listeners get one delta, at the end, equal to what one update would have published, and the final state is
    the same. An update() of another source made meanwhile reaches the listeners with it, not before (an agent
    never sees a state in between). Upserts go before removals: the replaced policy stays until its successor is
    in, so no step leaves the pods with no ALLOW policy (which would allow everything)."""
    changes = pods(N)
    changes.update([contribution(allow_policy("new"))])
    changes["kube:AuthorizationPolicy/demo/old"] = None

    reference = new_store()
    expected = reference.update(changes)

    store = new_store()
    published: list[Delta] = []
    store.subscribe(published.append)
    seen: list[tuple[bool, bool, bool, bool]] = []
    stop = False

    def tick() -> None:  # another loop user: records what it sees of the store, every turn of the loop
        pols = store.translator.authorizations()
        first, last = (store.offered(f"kube:Pod/demo/web-{i}") != {} for i in (0, N - 1))
        seen.append((first, last, "demo/old" in pols, "demo/new" in pols))
        if len(seen) == 3:  # mid-way: another source's update
            store.update(dict([contribution(pod("other", "10.9.0.1"))]))
        if not stop:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    merged = await store.update_in_steps(changes, step=4, budget=0.0)
    stop = True

    assert sum(1 for first, last, _, _ in seen if first and not last) > 2, "no callback ran mid-way"
    assert all(old or new for _, _, old, new in seen), "a step left no ALLOW policy"
    assert len(published) == 1, [len(d.addresses) for d in published]
    other = "Kubernetes//Pod/demo/other"  # selected by the new policy too, so in the later steps' deltas
    assert {k: v for k, v in merged.addresses.items() if k != other} == expected.addresses
    assert merged.authorizations == expected.authorizations
    assert published[0].addresses.keys() == expected.addresses.keys() | {other}
    assert {k: v for k, v in published[0].addresses.items() if k != other} == expected.addresses
    assert published[0].authorizations == expected.authorizations
    addresses, authorizations = state(store)
    ref_addresses, ref_authorizations = state(reference)
    assert {k: v for k, v in addresses.items() if k != other} == ref_addresses
    assert authorizations == ref_authorizations
    assert ObjectKey("AuthorizationPolicy", "demo", "old") not in store.translator.objects()


async def test_a_cancelled_stepped_update_still_publishes_what_it_applied() -> None:
    """Cancelled (the controller stopping) or failed mid-way, the translator has moved: the listeners get that."""
    store = new_store()
    published: list[Delta] = []
    store.subscribe(published.append)
    task = asyncio.create_task(store.update_in_steps(pods(N), step=4, budget=0.0))

    def tick() -> None:
        if store.offered("kube:Pod/demo/web-8") != {}:
            task.cancel()
        else:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert ObjectKey("Pod", "demo", f"web-{N - 1}") not in store.translator.objects()  # cut short
    assert len(published) == 1
    assert published[0].addresses.keys() == store.translator.addresses().keys() - state(new_store())[0].keys()


async def test_a_large_list_from_the_watch_thread_is_applied_in_steps_in_order() -> None:
    """Through the kube source as its watch threads hand lists over (from_thread): a list larger than a step is
    applied while the loop keeps running (fails before: the loop ran nothing until the whole list was in), and
    events handed over after it (a newer version of a listed pod, a deletion) are applied after it, not
    overwritten by the list's older versions."""
    store = new_store()
    src = KubeSource(store, api=None, step=4, step_budget=0.0)
    src._loop = asyncio.get_running_loop()
    listed = pods(N)
    newer_sid, newer = contribution(pod("web-3", "10.7.0.3"))
    seen: list[bool] = []
    stop = False

    def tick() -> None:
        seen.append(store.offered("kube:Pod/demo/web-0") != {} and store.offered(f"kube:Pod/demo/web-{N - 1}") == {})
        if not stop:
            asyncio.get_running_loop().call_soon(tick)

    def watch_thread() -> None:
        src.from_thread(src.relisted, PODS, listed)
        src.from_thread(src.changed, PODS, "MODIFIED", newer_sid, newer)
        src.from_thread(src.changed, PODS, "DELETED", "kube:Pod/demo/web-5", None)

    asyncio.get_running_loop().call_soon(tick)
    thread = threading.Thread(target=watch_thread)
    thread.start()
    thread.join()
    await wait_for(lambda: store.offered(f"kube:Pod/demo/web-{N - 1}") != {}, what="the whole list")
    await src.idle()
    stop = True
    assert any(seen), "no loop callback ran while the list was applied"
    objects = store.translator.objects()
    assert getattr(objects[ObjectKey("Pod", "demo", "web-3")], "ips", ()) == ("10.7.0.3",)
    assert ObjectKey("Pod", "demo", "web-5") not in objects
    assert src._known["Pod"] == set(listed) - {"kube:Pod/demo/web-5"}
    src.stop()
