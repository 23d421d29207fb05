"""Every example workflow opened in the frontend the ComfyUI server serves (its comfyui-frontend-package), in
headless Chromium, the way its templates browser opens one: the template's JSON handed to `app.loadGraphData` (read
from the repository: 0.12.1's fork lists the pack's templates but does not serve them). The load must be clean:
every node type known (no missing-nodes warning), no node marked with errors, no dialog, no console or page error
while it loads, widget values saved back unchanged and valid for their widgets (combo choices, number ranges), and
every node at least as large as LiteGraph computes for its content (`node.computeSize()`) and no node over another
(the frontend grows a node smaller than its content over its neighbour: a widget shows half-hidden).

Needs the `playwright` package and a Chromium (`chromium` on PATH, Debian's /usr/bin/chromium); skipped, saying
which is missing, without them. The page gets no network: requests off the server are refused.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.comfyui.conftest import flux2_unsupported_reason
from tests.conftest import ROOT

TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
PACK_PREFIX = "UMO"  # this pack's node types: unknown ones are always a failure, never a host's missing feature
# The fork behind ComfyUI 0.12.1 loads an extension that awaits the Ace editor from this CDN before the frontend
# starts: offline it never starts. The page gets a stand-in for that one script.
ACE_EDITOR = "https://cdn.jsdelivr.net/npm/ace-builds@"
ACE_STAND_IN = "window.ace = {config: {set() {}}};"
QUIET_SECONDS = 0.5  # no request in flight for this long: the load's image previews and look-ups are done
# Loads the workflow as the templates browser does and reads back what the frontend made of each node.
LOAD_AND_READ = """
async ([workflow, name]) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(workflow, true, true, name);
    const choices = (widget) => {
        const values = widget.options?.values;
        return typeof values === "function" ? values() : values;
    };
    return app.graph.nodes.map((node) => ({
        id: String(node.id),
        type: node.type,
        known: node.type in LiteGraph.registered_node_types,
        has_errors: Boolean(node.has_errors),
        min_size: Array.from(node.computeSize()),
        // title bar included (LiteGraph draws it above pos); not getBounding(): older frontends update it only
        // when they draw the node
        bounds: [node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                 node.size[0], node.size[1] + LiteGraph.NODE_TITLE_HEIGHT],
        saved_values: node.serialize().widgets_values ?? [],
        widgets: (node.widgets ?? []).map((widget) => ({
            name: widget.name, type: widget.type, value: widget.value,
            choices: widget.type === "combo" ? choices(widget) ?? null : null,
            min: widget.options?.min ?? null, max: widget.options?.max ?? null,
        })),
    }));
}
"""
OPEN_DIALOGS = """
() => [...document.querySelectorAll("[role=dialog], [role=alertdialog]")]
    .map((dialog) => dialog.innerText.trim()).filter((text) => text)
"""


def _playwright():
    """playwright's sync API, or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the frontend test needs the playwright package (pip install playwright)")
    return sync_playwright


def _chromium() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("the frontend test needs Chromium on PATH as `chromium` (Debian/Ubuntu: apt-get install chromium)")
    return chromium


class Frontend:
    """One browser tab on the server's frontend, recording console errors, page errors and requests in flight."""

    def __init__(self, browser, url: str):
        self.url = url
        self.page = browser.new_page(viewport={"width": 1600, "height": 1000})
        self.errors: list[str] = []
        self.in_flight: set = set()
        self.last_request = time.monotonic()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("request", self._on_request)
        self.page.on("requestfinished", self._on_request_done)
        self.page.on("requestfailed", self._on_request_done)
        self.page.route(lambda url: not url.startswith(self.url), self._off_server)
        self.page.route("**/object_info", self._object_info)
        self.page.goto(url)
        self.page.wait_for_function("""() => window.comfyAPI?.app?.app?.canvas
                                       && LiteGraph.registered_node_types.Note
                                       && LiteGraph.registered_node_types.UMOReferenceConditioning""",
                                    timeout=600_000)  # minutes on a busy 2-core machine
        self.wait_quiet()

    def _on_console(self, message) -> None:
        # Off-server resources are refused (no network here): their "failed to load" lines are not the template's.
        if message.type == "error" and message.location.get("url", "").startswith(self.url):
            self.errors.append(f"console error: {message.text}")

    def _on_request(self, request) -> None:
        self.in_flight.add(request)
        self.last_request = time.monotonic()

    def _on_request_done(self, request) -> None:
        self.in_flight.discard(request)
        self.last_request = time.monotonic()

    @staticmethod
    def _off_server(route) -> None:
        if route.request.url.startswith(ACE_EDITOR):
            route.fulfill(content_type="text/javascript", body=ACE_STAND_IN)
        else:
            route.abort()

    @staticmethod
    def _object_info(route) -> None:
        """The node definitions as the server sends them, except a null python_module (0.12.1's fork reports one
        for two compositing nodes): frontend 1.58 stops registering every node at it, so the frontend would not
        start. "nodes" is what ComfyUI reports for its own nodes."""
        response = route.fetch()
        definitions = response.json()
        for definition in definitions.values():
            if definition.get("python_module") is None:
                definition["python_module"] = "nodes"
        route.fulfill(response=response, json=definitions)

    def wait_quiet(self, timeout: float = 120) -> None:
        """Wait until no request has been in flight for QUIET_SECONDS (image previews, node look-ups)."""
        deadline = time.monotonic() + timeout
        while self.in_flight or time.monotonic() - self.last_request < QUIET_SECONDS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight: {[r.url for r in self.in_flight]}")
            self.page.wait_for_timeout(100)

    def load(self, workflow: dict, name: str) -> tuple[list[dict], list[str]]:
        """Open `workflow` as a template: what the frontend made of each node, and every error and dialog the load
        caused. The dialogs are closed afterwards, as a user closes them before opening the next template."""
        self.errors.clear()
        nodes = self.page.evaluate(LOAD_AND_READ, [workflow, name])
        self.wait_quiet()
        dialogs = self.page.evaluate(OPEN_DIALOGS)
        self.close_dialogs()
        return nodes, self.errors + [f"dialog: {text}" for text in dialogs]

    def close_dialogs(self, tries: int = 5) -> None:
        for _ in range(tries):
            if not self.page.evaluate(OPEN_DIALOGS):
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)
        raise RuntimeError(f"Escape does not close the frontend's dialogs: {self.page.evaluate(OPEN_DIALOGS)}")

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def open_frontend(request) -> Callable[[], Frontend]:
    """Opens a new tab on the server's frontend. Playwright and Chromium are looked for before ComfyUI starts (a test
    or fixture naming the session-scoped `comfy` would start it first)."""
    sync_playwright = _playwright()
    chromium = _chromium()
    comfy = request.getfixturevalue("comfy")
    # The first start of a new frontend opens the templates browser over the canvas; a user who has seen it once
    # gets the canvas.
    comfy.post("/api/settings/Comfy.TutorialCompleted", True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield functools.partial(Frontend, browser, comfy.url)
        browser.close()


@pytest.fixture(scope="module")
def frontend(open_frontend) -> Frontend:
    frontend = open_frontend()
    yield frontend
    frontend.close()


def load_problems(workflow: dict, nodes: list[dict], errors: list[str]) -> list[str]:
    """Everything wrong with a template's load in the frontend, one line each."""
    problems = list(errors)
    expected = {str(node["id"]): node for node in workflow["nodes"]}
    if sorted(expected) != sorted(node["id"] for node in nodes):
        problems.append(f"the graph holds nodes {sorted(n['id'] for n in nodes)}, the template {sorted(expected)}")
    for node in nodes:
        template = expected.get(node["id"])
        if template is None:
            continue
        name = f"node {node['id']} {node['type']}"
        if not node["known"]:
            problems.append(f"{name}: unknown node type (the frontend's missing-nodes warning)")
        if node["has_errors"]:
            problems.append(f"{name}: marked with errors")
        width, height = template["size"]
        min_width, min_height = node["min_size"]
        if width < min_width or height < min_height:
            problems.append(f"{name}: size {width}x{height} is smaller than its content "
                            f"{min_width:.0f}x{min_height:.0f} (a widget shows half-hidden)")
        if node["saved_values"] != template.get("widgets_values", []):
            problems.append(f"{name}: widget values {node['saved_values']} != the template's "
                            f"{template.get('widgets_values', [])}")
        for widget in node["widgets"]:
            value = widget["value"]
            if widget["choices"] is not None and value not in widget["choices"]:
                problems.append(f"{name}: {widget['name']} {value!r} is not one of its choices")
            if widget["type"] == "number":
                low, high = widget["min"], widget["max"]
                if (low is not None and value < low) or (high is not None and value > high):
                    problems.append(f"{name}: {widget['name']} {value} is outside {low}..{high}")
    for first, second in itertools.combinations(nodes, 2):
        if _overlap(first["bounds"], second["bounds"]):
            problems.append(f"node {first['id']} {first['type']} and node {second['id']} {second['type']} overlap "
                            "(one covers the other's widgets)")
    return problems


def _overlap(first: list[float], second: list[float]) -> bool:
    """Whether two LiteGraph bounding boxes [x, y, width, height] (title bar included) overlap."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = first, second
    return x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1


def _unknown_host_nodes(nodes: list[dict]) -> list[str]:
    """Node types unknown to this ComfyUI that are ComfyUI's own (not this pack's)."""
    return sorted({n["type"] for n in nodes if not n["known"] and not n["type"].startswith(PACK_PREFIX)})


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_loads_clean_in_the_frontend(frontend, path: Path):
    workflow = json.loads(path.read_text())
    nodes, errors = frontend.load(workflow, path.stem)
    missing = _unknown_host_nodes(nodes)
    if missing:
        reason = flux2_unsupported_reason()
        if reason:  # a FLUX.2 template on a ComfyUI without FLUX.2's nodes: not the template's fault
            pytest.skip(f"{path.stem} needs {', '.join(missing)}, which this ComfyUI lacks: {reason}")
    problems = load_problems(workflow, nodes, errors)
    assert not problems, f"{path.stem} in the frontend:\n" + "\n".join(problems)


def test_a_broken_template_is_caught(open_frontend):
    """The checks can fail: an unknown node type, a node shrunk below its content, a combo value that is not one of
    its choices and a node moved over another each give their problem line."""
    workflow = json.loads((ROOT / "example_workflows" / "umo_uno_two_identities.json").read_text())
    nodes_by_type = {node["type"]: node for node in workflow["nodes"]}
    nodes_by_type["UMOReferenceConditioning"]["size"] = [200, 120]
    nodes_by_type["UMOFaceModelLoader"]["type"] = "UMONoSuchNode"
    nodes_by_type["KSampler"]["widgets_values"][4] = "no_such_sampler"
    conditioning = nodes_by_type["UMOReferenceConditioning"]
    nodes_by_type["FluxGuidance"]["pos"] = [conditioning["pos"][0] + 20, conditioning["pos"][1] + 100]
    frontend = open_frontend()
    try:
        nodes, errors = frontend.load(workflow, "broken")
    finally:
        frontend.close()
    problems = "\n".join(load_problems(workflow, nodes, errors))
    for problem in ("UMONoSuchNode: unknown node type", "UMOReferenceConditioning: size 200x120 is smaller",
                    "KSampler: sampler_name 'no_such_sampler' is not one of its choices",
                    "UMOReferenceConditioning and node 9 FluxGuidance overlap"):
        assert problem in problems, problems
