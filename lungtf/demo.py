"""Web demo: drop in lung tiles and see what the served model answers.

``python -m lungtf.demo --target HOST:PORT [--model-name lungtf] [--port 7860] [--host 127.0.0.1] [--examples DIR ...]
[--run RUN_DIR [--data-root DIR]] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]``

The page is a Gradio app and a *client* of the served model: every answer comes from the gRPC
server (``python -m lungtf.serving`` in development, TensorFlow Serving in production) through
``lungtf.client.LungClient``, so what a person sees is exactly what production answers. No model
is loaded here.

For each uploaded or clicked tile the page shows the three class probabilities as bars, the
predicted class in words (``lungtf.constants.CLASS_DESCRIPTIONS``) and an "uncertain - refer to a
pathologist" flag when the top probability is below the ``uncertainty_threshold`` stored in the
served model's ``lungtf.json``. Errors are shown on the page, never raised into Gradio: an
unreachable server gives one message naming the target, a file the server cannot decode gets the
server's INVALID_ARGUMENT message next to it, and the page stays usable. The footer states the
served version, the model's test accuracy and missed cancers with their split protocol, and that
this is a research tool, not a diagnosis. Analytics are off, there is no share link, and the app
binds 127.0.0.1 unless told otherwise.

The page's HTML, footer and CSS are ``lungtf.demo_page`` (plain functions, re-exported here).

"Show evidence" (``lungtf.demo_evidence``) sends each tile to the ``explain`` signature instead
and shows its Grad-CAM overlay (``lungtf.overlay``) beside the bars. The toggle appears only
while the served version has ``explain`` (its signatures, from ``GetModelMetadata``); a model
exported before ``explain`` existed gets a note saying so instead.

Files: the page serves exactly its example tiles (each a JPEG/PNG file whose resolved path lies
inside its example folder, or inside the run's data root for ``--run``; symlinks that lead out
are skipped), never their folders. Uploads land in a private temporary folder (mode 0700, not
the shared ``/tmp/gradio``) that Gradio empties of files older than ``CACHE_SECONDS[1]`` every
``CACHE_SECONDS[0]`` seconds and that is removed when the process ends; at most
``MAX_FILES_PER_UPLOAD`` files are classified at once; thumbnails open only JPEG/PNG up to
``MAX_IMAGE_PIXELS`` and shrink while decoding.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import time

import gradio as gr
import grpc

from lungtf.client import (
    IMAGE_SUFFIXES,
    LungClient,
    LungClientError,
    add_tls_arguments,
    credentials_from_args,
)
from lungtf.constants import CLASS_DESCRIPTIONS  # noqa: F401  (lungtf.demo.CLASS_DESCRIPTIONS)
from lungtf.demo_evidence import explain_support, explain_tile, overlay_label, overlay_uri
from lungtf.demo_files import find_examples, thumbnail_uri
from lungtf.demo_page import (  # noqa: F401  (re-exported: lungtf.demo.<name> still works)
    CSS,
    DISCLAIMER,
    UNCERTAIN,
    TileResult,
    footer_text,
    format_probability,
    is_uncertain,
    render_results,
    render_tile,
)

UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_FILES_PER_UPLOAD = 16
"""Most files classified from one upload (one Predict call each); more are refused, not queued."""
CACHE_SECONDS = (60, 300)
"""Gradio's ``delete_cache``: every 60 s, uploads older than 300 s are deleted."""


def unreachable_message(target: str, err: LungClientError) -> str:
    """The page-level message when the model server cannot be reached."""
    return (
        f"Cannot reach the model server at {target} ({err.code.name}: {err.message}). "
        "Start it (python -m lungtf.serving serve ... or TensorFlow Serving) and try again."
    )


def served_version(status: dict[str, Any]) -> int | None:
    """The newest AVAILABLE version in a ``LungClient.status()`` answer (the one that answers)."""
    versions = [v["version"] for v in status.get("versions", []) if v.get("state") == "AVAILABLE"]
    return max(versions) if versions else None


class DemoBackend:
    """Turns files into page content by asking the served model (one ``LungClient``)."""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        model_name: str = "lungtf",
    ) -> None:
        self.target = target
        self.client = LungClient(
            target, timeout=timeout, retries=1, credentials=credentials, model_name=model_name
        )

    def model_info(self) -> tuple[dict[str, Any] | None, int | None, str]:
        """``(metadata, served version, error message)``; metadata is ``None`` on an error."""
        try:
            return self.client.metadata(), served_version(self.client.status()), ""
        except LungClientError as err:
            if err.code in UNREACHABLE_CODES:
                return None, None, unreachable_message(self.target, err)
            return None, None, f"the server at {self.target} answered {err}"

    def footer(self) -> str:
        """The footer for the served model as it is now."""
        metadata, version, error = self.model_info()
        return footer_text(metadata, version, self.target, error)

    def evidence(self) -> tuple[bool, str]:
        """Whether the served version can show evidence, and why not (``explain_support``)."""
        return explain_support(self.client)

    def _answer(self, path: str, evidence: bool) -> TileResult:
        name, thumb = Path(path).name, thumbnail_uri(path)
        if not evidence:
            return TileResult(name, self.client.predict([path])[0], None, thumb)
        prediction, heatmap = explain_tile(self.client, path)
        return TileResult(name, prediction, None, thumb, overlay_uri(path, heatmap,
                                                                      overlay_label(prediction)))

    def classify(self, paths: Sequence[str], evidence: bool = False) -> tuple[str, str]:
        """``(results HTML, footer markdown)`` for image files, one Predict call per file.

        With ``evidence`` each file goes to the ``explain`` signature instead, whose answer
        holds the same probabilities plus the heatmap drawn beside them, when the served
        version has it (else the page says why and shows probabilities only). More than ``MAX_FILES_PER_UPLOAD`` files are refused as a whole. One call per file lets a file the server cannot decode get its own INVALID_ARGUMENT
        message while the others still get answers. An unreachable server stops the loop and
        gives one page-level message naming the target and the tiles left unanswered.
        """
        names = [Path(p).name for p in paths]
        if len(paths) > MAX_FILES_PER_UPLOAD:
            alert = (
                f"{len(paths)} files at once; at most {MAX_FILES_PER_UPLOAD} are classified per "
                "upload. Upload fewer."
            )
            return render_results([], None, alert), self.footer()
        metadata, version, problem = self.model_info()
        threshold = None if metadata is None else metadata.get("uncertainty_threshold")
        note = ""
        if evidence and not problem:
            evidence, note = self.evidence()
        results: list[TileResult] = []
        for path, name in zip(paths, names):
            if problem:
                break
            try:
                results.append(self._answer(path, evidence))
            except LungClientError as err:
                if err.code in UNREACHABLE_CODES:
                    problem = unreachable_message(self.target, err)
                    break
                reason = f"The server rejected this file: {err.code.name}: {err.message}"
                results.append(TileResult(name, error=reason, thumbnail=thumbnail_uri(path)))
            except OSError as err:
                results.append(TileResult(name, error=f"Could not read this file: {err}"))
        alert = f"{problem} Not classified: {', '.join(names[len(results) :])}." if problem else note
        footer = footer_text(metadata, version, self.target, problem)
        return render_results(results, threshold, alert), footer


@functools.cache
def private_cache() -> Path:
    """This process's temporary folder for Gradio's uploads (mode 0700), removed at exit.

    Gradio's default cache is the shared ``/tmp/gradio``, where uploaded tiles would stay
    readable by other local users. The folder is made once per process, inside
    ``$GRADIO_TEMP_DIR`` when that is set, and ``GRADIO_TEMP_DIR`` then names it: Gradio reads
    that variable whenever it checks where an upload may live, so one process has one cache.
    """
    folder = Path(tempfile.mkdtemp(prefix="lungtf-demo-", dir=os.environ.get("GRADIO_TEMP_DIR")))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def build_app(
    backend: DemoBackend,
    examples: Sequence[tuple[str, str]] = (),
    cache_seconds: tuple[int, int] = CACHE_SECONDS,
) -> Any:
    """The Gradio page: upload box, evidence toggle, example gallery, results panel and footer.

    The "show evidence" toggle is visible only while the served version has the ``explain``
    signature (checked on load and with every answer); otherwise a note says why. Flipping it
    answers the files on the page again, with or without their Grad-CAM overlays.

    The footer is refreshed on every page load and with every answer, so it follows hot-swapped
    model versions and a server that comes back. Uploads go to a ``private_cache`` folder;
    every ``cache_seconds[0]`` s Gradio deletes the ones older than ``cache_seconds[1]`` s.
    """
    example_paths = [path for path, _ in examples]
    private_cache()
    with gr.Blocks(
        title="lungtf: lung tile classifier", analytics_enabled=False, delete_cache=cache_seconds
    ) as app:
        gr.Markdown(
            "# Lung histopathology tile classifier\n"
            f"Upload up to {MAX_FILES_PER_UPLOAD} lung tiles (JPEG/PNG) or click an example. "
            f"Every answer comes from the model served at `{backend.target}`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label="Tiles",
                    file_count="multiple",
                    file_types=list(IMAGE_SUFFIXES),
                    elem_id="lungtf-upload",
                )
                evidence = gr.Checkbox(
                    label="Show evidence (Grad-CAM: where the model looked)",
                    value=False,
                    visible=False,
                    elem_id="lungtf-evidence",
                )
                evidence_note = gr.Markdown(elem_id="lungtf-evidence-note")
                gallery = gr.Gallery(
                    value=list(examples),
                    label="Examples (click one)",
                    columns=3,
                    height="auto",
                    object_fit="cover",
                    allow_preview=False,
                    interactive=False,
                    visible=bool(examples),
                    elem_id="lungtf-examples",
                )
            with gr.Column(scale=2):
                results = gr.HTML(render_results([], None), elem_id="lungtf-results")
        footer = gr.Markdown(elem_id="lungtf-footer")
        shown = gr.State([])  # the files on the page, answered again when the toggle flips

        def controls() -> tuple[Any, str]:
            available, why = backend.evidence()  # per answer: the served version may change
            return gr.update(visible=available), why

        def answer(paths: list[str], show: bool) -> tuple[Any, ...]:
            if not paths:
                return render_results([], None), backend.footer(), [], *controls()
            return *backend.classify(paths, bool(show)), paths, *controls()

        def on_files(paths: list[str] | None, show: bool) -> tuple[Any, ...]:
            return answer(paths or [], show)

        def on_example(show: bool, evt: gr.SelectData) -> tuple[Any, ...]:
            return answer([example_paths[evt.index]], show)

        outputs = [results, footer, shown, evidence, evidence_note]
        files.change(on_files, inputs=[files, evidence], outputs=outputs)
        gallery.select(on_example, inputs=evidence, outputs=outputs)
        evidence.input(answer, inputs=[shown, evidence], outputs=outputs)
        app.load(lambda: (backend.footer(), *controls()), outputs=[footer, evidence, evidence_note])
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m lungtf.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m lungtf.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", required=True, help="gRPC HOST:PORT of the served model")
    parser.add_argument("--model-name", default="lungtf", help="model_spec.name to ask")
    parser.add_argument("--host", default="127.0.0.1", help="address the page binds (loopback)")
    parser.add_argument("--port", type=int, default=7860, help="HTTP port of the page")
    parser.add_argument(
        "--examples", nargs="+", default=[], metavar="DIR", help="folders of example tiles"
    )
    parser.add_argument("--run", help="a training run directory: examples from its test split")
    parser.add_argument(
        "--data-root", help="folder the --run tiles must lie in (default: its config.yaml data)"
    )
    parser.add_argument(
        "--per-source", type=int, default=6, help="examples taken from each folder and from the run"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per gRPC call")
    add_tls_arguments(parser)
    return parser.parse_args(argv)


def launch(
    app: Any, host: str, port: int, examples: Sequence[tuple[str, str]], block: bool = True
) -> str:
    """Serve ``app`` on ``host:port`` with no share link and uploads of at most 25 MB; the
    example files themselves (not their folders) are the only extra files the page may serve.
    Returns the page's local URL (at once when ``block`` is false, after the server stops
    otherwise)."""
    allowed = sorted({str(Path(path).resolve()) for path, _ in examples})
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=allowed,
        css=CSS,
        ssr_mode=False,
        quiet=True,
        footer_links=[],
        max_file_size="25mb",
    )
    return url


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until interrupted; returns the exit code (2 on bad example sources or TLS files)."""
    args = parse_args(argv)
    try:
        examples = find_examples(args.examples, args.run, args.per_source, args.data_root)
        credentials = credentials_from_args(args)
    except (ValueError, OSError) as err:  # missing examples, bad TLS files
        print(f"error: {err}", file=sys.stderr)
        return 2
    backend = DemoBackend(
        args.target, timeout=args.timeout, credentials=credentials, model_name=args.model_name
    )
    print(f"demo on http://{args.host}:{args.port} asking the model at {args.target}", flush=True)
    launch(build_app(backend, examples), args.host, args.port, examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
