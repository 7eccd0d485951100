"""`vlsearch chat IMAGE`: a conversation with the generative model about one image. A thin shell over
Service.ask: one question per line of stdin (a terminal or a pipe), `/reset` starts over, end of input ends."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Annotated

import typer
from PIL import Image
from rich.markup import escape

from cli.main import CollectionOpt, ModelOpt, PretrainedOpt, VlmOpt, app, err, reports_errors, service_for
from core.service import Answer, Service, Turn, VlsearchError

RESET = "/reset"


@app.command()
@reports_errors
def chat(
    image: Annotated[str, typer.Argument(help="An image file, or the id of a stored image.")],
    vlm: VlmOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each answer as one line of JSON.")] = False,
) -> None:
    """Talk with the generative model about one image: a question per line, /reset starts over, Ctrl-D ends."""
    interactive = sys.stdin.isatty()
    with service_for(model, pretrained, vlm_model=vlm) as service:
        picture = service.resolve_image(image, collection)
        if interactive:
            err.print(f"Asking about {escape(image)}: one question per line, {RESET} starts over, Ctrl-D ends.")
        history: list[Turn] = []
        while (line := _read_line(interactive)) is not None:
            question = line.strip()
            if not question:
                continue
            if question == RESET:
                history.clear()
                err.print("New conversation.")
                continue
            answer = _answer(service, picture, question, collection, history)
            if answer is None:
                continue
            answer = replace(answer, image=image)
            # The turns the model left out would be left out again: the next question starts from those it read.
            history = [*history[answer.turns_dropped :], (question, answer.answer)]
            if answer.turns_dropped:
                err.print(
                    f"({answer.turns_dropped} older turn{'s' if answer.turns_dropped > 1 else ''} dropped to fit "
                    "the model's context)",
                    highlight=False,
                )
            print(json.dumps(answer.to_dict()) if as_json else answer.answer, flush=True)


def _read_line(interactive: bool) -> str | None:
    """The next line of input, None at its end (Ctrl-D, or the end of a pipe)."""
    if interactive:
        err.print("> ", end="")
    line = sys.stdin.readline()
    return line if line else None


def _answer(
    service: Service, picture: Image.Image, question: str, collection: str | None, history: list[Turn]
) -> Answer | None:
    """The answer, or None after printing why there is none: a bad question does not end the conversation."""
    try:
        return service.ask(picture, question, collection, history)
    except VlsearchError as error:
        err.print(f"[red]error:[/red] {escape(' '.join(str(error).split()))}", highlight=False, soft_wrap=True)
        return None
