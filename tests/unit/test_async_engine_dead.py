"""When the engine thread dies, every queued command fails with the engine's error and none of
them runs against the dead engine; later calls fail at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shared.engine import AsyncEngine, EngineDeadError
from shared.engine.engine import EngineStats


class DyingEngine:
    """Stands in for LLMEngine: its step blocks until released, then fails."""

    def __init__(self) -> None:
        self.stepping = threading.Event()
        self.release = threading.Event()
        self.ran: list[str] = []

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0)

    def has_unfinished(self) -> bool:
        return True

    def step(self):
        self.stepping.set()
        self.release.wait(5)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_queued_commands_fail_with_the_engine_error_and_never_run():
    engine = DyingEngine()
    aeng = AsyncEngine(engine).start()
    await asyncio.to_thread(engine.stepping.wait, 5)  # the engine thread is inside step()
    calls = [asyncio.ensure_future(aeng.call(lambda eng, i=i: eng.ran.append(f"cmd{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)  # queued behind the step
    engine.release.set()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert all("illegal memory access" in str(r) for r in results), "the engine's own error, not a generic one"
    assert engine.ran == [], "no command ran against the dead engine"
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        await aeng.call(lambda eng: eng.ran.append("late"))
    assert engine.ran == []


async def test_commands_queued_behind_a_shutdown_fail_instead_of_hanging():
    engine = DyingEngine()
    engine.has_unfinished = lambda: False  # idle: waits for commands
    aeng = AsyncEngine(engine).start()
    aeng.shutdown(timeout=5)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(aeng.call(lambda eng: eng.ran.append("after")), 5)
    assert engine.ran == []
