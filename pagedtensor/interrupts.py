"""Ctrl-C inside a PagedTensor op or a pager call is raised as the call returns.

A Ctrl-C lands between any two bytecodes. Inside the pager's bookkeeping it would leave a page half
moved: a slot taken and not recorded, a policy entry without its copy, a pin that no release will
undo. So while the main thread is inside an op on PagedTensors or a pager call
(:func:`deferring`), the SIGINT handler the pager installs only notes the interrupt, and
``KeyboardInterrupt`` is raised as the outermost such call returns (its result dropped), or sooner
where the pager waits for other threads' pins (:func:`interruptible`; nothing of the pager's is half
done there, though an op run a piece at a time keeps the pieces it wrote before, as on any error).
A Ctrl-C outside them raises at once, as Python's own handler does.

The handler is installed by a :class:`~pagedtensor.Pager` made on the main thread, and again by any
such call that finds Python's default handler back (a notebook kernel sets it for each cell), only
where SIGINT has Python's default handler (``KeyboardInterrupt``). A handler of the program's own
is left alone: its exceptions then land wherever the signal does, as without the pager. A free run
by the garbage collector (a PagedTensor dropped: a callback marked :func:`runs_whole`) is done
whole; a Ctrl-C landing in it, before its pager call began too, is lost, as Python loses whatever a
finalizer raises.
"""

from __future__ import annotations

import contextlib
import _signal
import functools
import signal
import threading
import types
from typing import Any, Callable, Iterator, Optional, TypeVar

from pagedtensor.outside_transforms import _dispatch_modes, _peek_interpreter_stack, outside_transforms

Function = TypeVar("Function", bound=Callable)

_getsignal = _signal.getsignal  # the C function: signal.getsignal converts its answer to an enum, a dozen calls
_SIGINT = int(signal.SIGINT)
_DEFAULT_HANDLER = signal.default_int_handler


class _Depth(threading.local):
    depth = 0  # how many deferring calls this thread is inside


_local = _Depth()
_pending = False  # a Ctrl-C arrived while the main thread was inside one


def install() -> None:
    """Install the deferring SIGINT handler from the main thread, where SIGINT has Python's default
    handler; otherwise leave signals as they are. Called by every Pager made and by every outermost
    deferring call that finds the default handler back (a notebook kernel sets it anew for each cell
    and puts its own back after it)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler or threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGINT, _note_or_raise)
    except (ValueError, OSError):  # an interpreter without signals (embedded): nothing to defer
        pass


def _note_or_raise(signum: int, frame: Optional[types.FrameType]) -> None:
    """The SIGINT handler (it runs on the main thread): noted inside a deferring call, dropped inside
    a finalizer that runs whole, else raised."""
    global _pending
    if _local.depth:
        _pending = True
        return
    if _inside_a_whole_finalizer(frame):
        return  # lost, as Python loses what a finalizer raises: the free it landed in runs whole
    signal.default_int_handler(signum, frame)


_WHOLE_FINALIZER_CODES: set[types.CodeType] = set()


def runs_whole(finalizer: Function) -> Function:
    """Mark ``finalizer`` (a weak reference's callback, which the garbage collector calls with no
    Python frame before it) as run whole: a Ctrl-C landing in it, before its pager call defers
    interrupts too, is dropped, not raised there (which lost the free for good: it runs once)."""
    _WHOLE_FINALIZER_CODES.add(finalizer.__code__)
    return finalizer


def _inside_a_whole_finalizer(frame: Optional[types.FrameType]) -> bool:
    """Whether ``frame`` or a caller of it runs a :func:`runs_whole` finalizer."""
    while frame is not None:
        if frame.f_code in _WHOLE_FINALIZER_CODES:
            return True
        frame = frame.f_back
    return False


def _raise_pending() -> None:
    global _pending
    if threading.current_thread() is threading.main_thread():  # the note is the main thread's
        _pending = False
        raise KeyboardInterrupt


def deferring(function: Function, undo: Optional[Callable[[Any], object]] = None) -> Function:
    """``function`` with a Ctrl-C arriving inside it raised as it returns (as the outermost such call
    returns, where they nest). ``undo``, where given, is called on the result the interrupt drops
    (``ensure_resident``'s pinned pages, released): nothing it holds is kept for good."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        local = _local
        depth = local.depth
        if not depth and _getsignal(_SIGINT) is _DEFAULT_HANDLER:
            install()  # the default handler is back (a notebook's next cell)
        local.depth = depth + 1
        try:
            return function(*args, **kwargs)
        finally:
            local.depth = depth
            if _pending and not depth:
                _raise_pending()

    @functools.wraps(function)
    def run_and_undo(*args, **kwargs):
        # Apart from ``run``: a result held in the wrapper's frame would keep the callers' frames
        # alive where it holds a traceback (a prefetch's future carrying its error) until a collection.
        local = _local
        depth = local.depth
        if not depth and _getsignal(_SIGINT) is _DEFAULT_HANDLER:
            install()
        local.depth = depth + 1
        try:
            result = function(*args, **kwargs)
        except BaseException:
            local.depth = depth
            if _pending and not depth:
                _raise_pending()
            raise
        if _pending and not depth and threading.current_thread() is threading.main_thread():
            try:
                undo(result)  # still deferring: the one interrupt is raised below
            finally:
                local.depth = depth
                _raise_pending()
        local.depth = depth
        return result

    return run if undo is None else run_and_undo  # type: ignore[return-value]


def pager_call(method: Function, undo: Optional[Callable[[Any], object]] = None) -> Function:
    """A pager method: :func:`deferring` (with ``undo``) and run outside ``torch.func`` transforms and
    dispatch modes (:func:`~pagedtensor.outside_transforms.outside_transforms`), in one frame where an
    op already defers and no transform or mode is active (every fault and release of an op: the hot
    path; the op's own interrupt handling then lets go of what it holds)."""
    guarded = deferring(outside_transforms(method), undo)

    @functools.wraps(method)
    def run(*args, **kwargs):
        if _local.depth and _peek_interpreter_stack() is None and not _dispatch_modes():
            return method(*args, **kwargs)
        return guarded(*args, **kwargs)

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A stretch inside a deferring call where a Ctrl-C raises at once (a wait that may be long and
    leaves nothing half done); one noted before it raises as it starts."""
    depth = _local.depth
    _local.depth = 0
    try:
        if _pending:
            _raise_pending()
        yield
    finally:
        _local.depth = depth
