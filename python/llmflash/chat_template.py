"""A store's chat template (Hugging Face's Jinja `chat_template`, kept in manifest.json) rendered
into the prompt the model answers. The template comes with the store, so it may be broken or
hostile: jinja2's ImmutableSandboxedEnvironment blocks unsafe attribute access but not work, and a
few lines of Jinja can loop for hours or build strings of gigabytes (nested loops over a long
string, `~` doubling a string in a loop, `"x".center(10**10)`). So:
  - the sandbox bounds what it can see cheaply: range() items, `*` / `+` results, `**` sizes and
    the output (the limits below), each a clear ChatTemplateError;
  - and the render runs in a child Python process (this module, without torch: quick to start) under
    RLIMIT_CPU, RLIMIT_AS and a wall-clock timeout, so whatever the sandbox cannot see ends as
    a ChatTemplateError too, never as a hang or an exhausted machine.
Every failure names `source`, the file the template came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .errors import ChatTemplateError

# Limits on rendering a chat template (it comes with the store, so it may be hostile or broken):
# the jinja2 sandbox blocks unsafe attributes but not work, so one render may create at most
# TEMPLATE_RANGE_ITEMS items with range() in all, build no string or list longer than
# TEMPLATE_SEQUENCE_ITEMS by * or +, and write at most TEMPLATE_OUTPUT_CHARS characters (plus 8
# per character of the messages).
TEMPLATE_RANGE_ITEMS = 1_000_000
TEMPLATE_SEQUENCE_ITEMS = 1_000_000
TEMPLATE_OUTPUT_CHARS = 1_000_000


def _limited_sandbox():
    """An ImmutableSandboxedEnvironment that bounds the work of one render (see the limits above)."""
    from jinja2.exceptions import TemplateRuntimeError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(seq: Any, n: Any) -> bool:
        return isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_SEQUENCE_ITEMS

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*" and (too_big(left, right) or too_big(right, left)):
                raise TemplateRuntimeError(f"a repetition longer than {TEMPLATE_SEQUENCE_ITEMS} items")
            if (
                operator == "+"
                and isinstance(left, (str, list, tuple))
                and isinstance(right, (str, list, tuple))
                and len(left) + len(right) > TEMPLATE_SEQUENCE_ITEMS
            ):
                raise TemplateRuntimeError(f"a concatenation longer than {TEMPLATE_SEQUENCE_ITEMS} items")
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and abs(left) > 1
                and right > 0
                and abs(left).bit_length() * right > 1 << 16
            ):
                raise TemplateRuntimeError(f"a power too large ({left} ** {right})")
            return super().call_binop(context, operator, left, right)

    env = Limited(trim_blocks=True, lstrip_blocks=True)
    left = [TEMPLATE_RANGE_ITEMS]

    def limited_range(*args: Any) -> range:
        r = range(*args)
        try:
            n = len(r)
        except OverflowError:
            n = TEMPLATE_RANGE_ITEMS + 1
        left[0] -= n
        if left[0] < 0:
            raise TemplateRuntimeError(f"range() would create more than {TEMPLATE_RANGE_ITEMS} items in one render")
        return r

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template: {message}")

    env.globals["range"] = limited_range
    env.globals["raise_exception"] = raise_exception
    return env


def render_here(
    template: str,
    messages: list[dict[str, str]],
    bos_token: str = "",
    eos_token: str = "",
    source: str | os.PathLike[str] | None = None,
) -> str:
    """Render in this process, in the limited sandbox (no process limits: render_chat adds them)."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    limit = TEMPLATE_OUTPUT_CHARS + 8 * sum(len(str(m.get("content", ""))) for m in messages)
    try:
        tmpl = _limited_sandbox().from_string(template)
        out, size = [], 0
        for piece in tmpl.generate(
            messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        ):
            size += len(piece)
            if size > limit:
                raise ChatTemplateError(f"chat template: output longer than {limit} characters", source)
            out.append(piece)
        return "".join(out)
    except ChatTemplateError as e:
        if e.path is None and source is not None:
            raise ChatTemplateError(str(e), source) from None
        raise
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}", source) from None
    except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}", source) from None


RENDER_SECONDS = 5.0  # CPU seconds (RLIMIT_CPU) and, plus a margin, wall seconds a render may take
RENDER_MEMORY = 1 << 30  # address space of the rendering process (RLIMIT_AS): ~40 MB is Python + jinja2


def render_chat(
    template: str | None,
    messages: list[dict[str, str]],
    bos_token: str = "",
    eos_token: str = "",
    source: str | os.PathLike[str] | None = None,
) -> str:
    """Render a Hugging Face chat template (Jinja), ready for the model to answer, in a sandbox in
    a child process with CPU, memory and time limits. Any failure (syntax, an undefined or unsafe
    access, the template's own raise_exception, the limits) is a ChatTemplateError naming
    `source` (where the template came from)."""
    if not template:
        # No template shipped: a plain, widely understood fallback.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    job = {
        "template": template,
        "messages": messages,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "seconds": RENDER_SECONDS,
        "memory": RENDER_MEMORY,
    }
    try:
        r = subprocess.run(
            [sys.executable, "-c", "from llmflash.chat_template import child; child()"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=RENDER_SECONDS + 5,
        )
    except subprocess.TimeoutExpired:
        raise ChatTemplateError(f"chat template: rendering took longer than {RENDER_SECONDS + 5:g} s", source) from None
    try:
        out = json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        out = None
    if isinstance(out, dict) and isinstance(out.get("text"), str):
        return out["text"]
    if isinstance(out, dict) and isinstance(out.get("error"), str):
        raise ChatTemplateError(out["error"], source)
    if r.returncode < 0:  # killed: SIGXCPU (the CPU limit) or SIGKILL
        raise ChatTemplateError(
            f"chat template: rendering stopped by signal {-r.returncode} "
            f"(limits: {RENDER_SECONDS:g} CPU s, {RENDER_MEMORY >> 20} MiB)",
            source,
        )
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    raise ChatTemplateError(f"chat template: the renderer failed (exit code {r.returncode}): {last}", source)


def child() -> None:
    """The rendering process: a job (JSON) on stdin, {"text": ...} or {"error": ...} on stdout."""
    import resource

    job = json.loads(sys.stdin.read())
    cpu = max(1, int(job["seconds"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
    try:
        text = render_here(job["template"], job["messages"], job["bos_token"], job["eos_token"])
        out: dict[str, Any] = {"text": text}
    except ChatTemplateError as e:
        out = {"error": str(e)}
    except MemoryError:
        out = {"error": f"chat template: rendering needs more than {job['memory'] >> 20} MiB"}
    sys.stdout.write(json.dumps(out))
