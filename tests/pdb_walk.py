"""Drive a pdb session in another process as a learner does: read what pdb printed at a stop, type
the next command. Used by test_debugger.py to replay the documented walk and to count the stops
from the first line of the forward pass to the first attention score and to the logits.

A stop is what pdb prints after a command that runs code (``s``, ``n``, ``r``, ``c``)::

    --Call--                                  (only on entering a function)
    > /abs/path/npgpt2/model.py(123)_forward()
    -> x = self._block(run, l, x, call)
    (Pdb)
"""

from __future__ import annotations

import os
import re
import select
import subprocess
from dataclasses import dataclass

PROMPT = "(Pdb) "
_WHERE = re.compile(r"^> (?P<file>.+)\((?P<line>\d+)\)(?P<function>[^()]+)\(\)(?P<returned>->.*)?$")


@dataclass
class Stop:
    """Where pdb stopped: the file, line and function it showed, the line's source, and whether the
    stop is the entry into a function (``--Call--``) or its return (``--Return--``)."""

    file: str
    line: int
    function: str
    source: str
    kind: str  # "line", "call" or "return"

    def __str__(self):
        return f"{os.path.basename(self.file)}({self.line}){self.function}() [{self.kind}] {self.source}"


def parse_stop(output: str) -> Stop | None:
    """The last stop shown in ``output`` (what pdb printed after one command), or None."""
    lines = output.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _WHERE.match(lines[i])
        if m:
            source = lines[i + 1][3:] if i + 1 < len(lines) and lines[i + 1].startswith("-> ") else ""
            before = lines[i - 1] if i > 0 else ""
            kind = "call" if before == "--Call--" else "return" if before == "--Return--" else "line"
            return Stop(m["file"], int(m["line"]), m["function"].strip(), source, kind)
    return None


class Session:
    """A process that runs pdb on its standard input, answered one command at a time."""

    def __init__(self, argv: list[str], cwd: str, env: dict | None = None, timeout: float = 120):
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.timeout = timeout
        self.transcript = ""
        self.first = self._until_prompt()  # what was printed up to the first (Pdb) prompt
        self.stop = parse_stop(self.first)  # where pdb stands

    def _until_prompt(self) -> str:
        """Read until pdb asks for a command; the text read. Raises if the process ends first."""
        chunks = []
        fd = self.proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"pdb printed no prompt in {self.timeout} s:\n{self.transcript}{''.join(chunks)}")
            data = os.read(fd, 65536).decode("utf-8", "replace")
            if not data:  # the process ended
                self.transcript += "".join(chunks)
                raise EOFError(f"the process ended before the next (Pdb) prompt:\n{self.transcript[-4000:]}")
            chunks.append(data)
            text = "".join(chunks)
            if text.endswith(PROMPT):
                self.transcript += text
                return text[: -len(PROMPT)]

    def send(self, command: str) -> str:
        """Type one command; what pdb printed in answer, up to its next prompt."""
        self.transcript += command + "\n"
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()
        out = self._until_prompt()
        self.stop = parse_stop(out) or self.stop
        return out

    def finish(self, commands: str = "c\n") -> str:
        """Type the last commands and read everything the process prints until it ends."""
        out, _ = self.proc.communicate(commands.encode(), timeout=self.timeout)
        text = out.decode("utf-8", "replace")
        self.transcript += commands + text
        return text

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def holds(session: Session, expression: str) -> bool:
    """Does ``expression`` hold in the frame where pdb stands? (``p`` runs no code of the model)"""
    answer = session.send(f"p {expression}").strip().splitlines()
    if not answer or answer[-1] not in ("True", "False"):
        raise AssertionError(f"p {expression} answered {answer}")
    return answer[-1] == "True"


def calls(source: str, functions) -> bool:
    """Does a line of source call one of ``functions`` (by name, plain or as an attribute)?"""
    code = source.split("#", 1)[0]
    return any(re.search(rf"(?<![\w]){re.escape(f)}\(|\.{re.escape(f)}\(", code) for f in functions)


def walk(session: Session, target: str, policy, limit: int = 400) -> list[Stop]:
    """Step with ``policy(stop) -> command`` until ``target`` (an expression) holds; the stops
    after the first, in order (their number is the count)."""
    stops = []
    while not holds(session, target):
        if len(stops) >= limit:
            raise AssertionError(f"{target} did not hold within {limit} stops; the last: {stops[-5:]}")
        stop = parse_stop(session.send(policy(session.stop)))
        if stop is None:
            raise AssertionError(f"no stop after a command:\n{session.transcript[-2000:]}")
        stops.append(stop)
    return stops


def only_step(stop: Stop) -> str:
    """The learner who only types ``s``."""
    return "s"


def knowing(path) -> callable:
    """The learner who knows the path: ``s`` into a line that calls a function on ``path``, ``n``
    over any other line, ``r`` out of a function off the path (entered on the way to one on it)."""

    def policy(stop: Stop) -> str:
        if stop.kind == "return":
            return "s"  # back in the caller: its next call or its next line
        if stop.function not in path:
            return "r"
        return "s" if stop.kind == "call" or calls(stop.source, path) else "n"

    return policy


def home(function: str) -> callable:
    """The learner who goes back up to ``function`` and runs its lines one by one: ``r`` out of any
    other function, ``n`` in it."""

    def policy(stop: Stop) -> str:
        if stop.kind == "return":
            return "n"
        return "n" if stop.function == function else "r"

    return policy
