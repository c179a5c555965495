"""The pack in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright for Python,
against a real ComfyUI server (main.py, 127.0.0.1, free port) with the real front end
(comfyui_frontend_package) and this pack installed as custom_nodes/comfyui-para.

For every example workflow: open it from the template browser (Templates -> Extensions -> comfyui-para),
check that no dialog (missing nodes/models) opened and every node type is known to the front end; then,
for the workflows the tiny test models can run, shrink the sizes/steps in the widgets, press Run, wait
for the prompt, and read the text each PaRa node shows on the canvas (the `$$node-text-preview` widget
the front end adds for progress text), which must match the node's /api/history entry.

Skipped, with the reason, where Playwright, Chromium or the front-end package is missing. Never calls
`playwright install`: the system browser is used (env PARA_CHROMIUM, default /usr/bin/chromium).
Screenshots go to env PARA_SCREENSHOTS if set, else the test's temp dir.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil

import pytest
import torch

from harness import REPO_ROOT, write_subject_images

_spec = importlib.util.spec_from_file_location("para_thumbnails", os.path.join(REPO_ROOT, "example_workflows", "make_thumbnails.py"))
THUMBNAILS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(THUMBNAILS)  # TITLE_TOP: where the thumbnails' titles start (below the front end's badges)

CHROMIUM = os.environ.get("PARA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _skip_reason() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "needs Playwright for Python (pip install playwright; the package only, no `playwright install`)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"needs Chromium at {CHROMIUM} (apt-get install chromium, or set PARA_CHROMIUM)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "needs the ComfyUI front end (pip install comfyui-frontend-package, from ComfyUI's requirements.txt)"
    return ""


_REASON = _skip_reason()
if _REASON:
    pytest.skip(f"browser test skipped: {_REASON}", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

from server_harness import ComfyServer  # noqa: E402

WORKFLOWS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))
TEXT_WIDGET = "$$node-text-preview"
LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
FF = "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"
TEQ = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
# Widgets set in the browser before Run, so that the tiny models run in seconds on a CPU.
TINY = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
        "SolidMask": {"width": 64, "height": 64}, "PaRaTrainer": {"steps": 2, "preview_every": 0, "save_every": 0, "training_dtype": "fp32"}}
# What each PaRa node must show after a run (a regex searched in the node's text).
EXPECTED = {
    "PaRaLoader": r"^model: \d+ layers? patched",
    "PaRaLoadFile": r"^\d+ layers?, rank \d",
    "PaRaApply": r"^model: \d+ layers? patched",
    "PaRaMerge": r"^overlap: .*principal angles.*\n(sequential|union) merge: \d+ layers?",
    "PaRaLoRACombine": r"^model: \d+ layers? patched.*with PaRa and LoRA",
    "PaRaSave": r"^saved para/[^ ]+_\d{5}_\.safetensors\n\d+ layers?, rank",
    "PaRaHook": r"^hook: \d+ layers?, rank ",
    "PaRaTrainer": r"^steps \d+, loss \d.*\n\d+ layers \(",
}
# Workflows whose checkpoint the tiny SD1.5 stands in for; others (SDXL/Flux training) are only loaded.
RUNNABLE_CKPT = "v1-5-pruned-emaonly.safetensors"




@pytest.fixture(scope="module")
def server(comfy):
    """ComfyUI serving the harness's folders, with model files under the names the example workflows use.
    Only files are made in this process (no prompt runs in-process): the server is the ComfyUI under test."""
    g = torch.Generator().manual_seed(800)
    ckpt = os.path.join(comfy.dirs["checkpoints"], RUNNABLE_CKPT)
    if not os.path.exists(ckpt):
        os.symlink(comfy.path("checkpoints", comfy.sd15_checkpoint()), ckpt)
    a = {LIN: [torch.randn(320, 8, generator=g)], FF: [torch.randn(2560, 8, generator=g)], TEQ: [torch.randn(768, 4, generator=g)]}
    b = {LIN: [torch.cat([a[LIN][0][:, :4], torch.randn(320, 4, generator=g)], 1)], FF: [torch.randn(2560, 4, generator=g)]}
    for name, stages in (("my_subject_para.safetensors", a), ("subject_a_para.safetensors", a), ("subject_b_para.safetensors", b)):
        if not os.path.exists(comfy.path("para", name)):
            comfy.write_para(name, stages)
    if not os.path.exists(comfy.path("loras", "my_style_lora.safetensors")):
        comfy.write_safetensors("loras", "my_style_lora.safetensors", {
            f"{FF}.lora_up.weight": torch.randn(2560, 8, generator=g) * 0.1, f"{FF}.lora_down.weight": torch.randn(8, 320, generator=g) * 0.1})
    for folder, name in (("checkpoints", "sd_xl_base_1.0.safetensors"), ("diffusion_models", "flux1-dev.safetensors"),
                         ("text_encoders", "clip_l.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")):
        # the SDXL / Flux workflows describe these (URL, folder): without them the front end offers their download
        path = os.path.join(comfy.base, "models", folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            open(path, "wb").close()
    for folder, seed in (("my_subject_images", 1), ("subject_a_images", 2), ("subject_b_images", 3)):
        write_subject_images(os.path.join(comfy.dirs["input"], folder), 2, seed)
    write_subject_images(os.path.join(comfy.dirs["input"], "photo"), 1, 4)
    shutil.copy(os.path.join(comfy.dirs["input"], "photo", "img_0.png"), os.path.join(comfy.dirs["input"], "my_photo.png"))
    srv = ComfyServer(comfy.comfy_root, comfy.base, REPO_ROOT)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    shots = os.environ.get("PARA_SCREENSHOTS") or str(tmp_path_factory.mktemp("screens"))
    os.makedirs(shots, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.goto(server.url)
        pg.wait_for_function("window.app?.graph && window.app.extensionManager?.command", timeout=120_000)
        pg.evaluate("""() => {
            window.__paraRuns = {};
            const api = window.app.api;
            api.addEventListener('execution_success', e => { window.__paraRuns[e.detail.prompt_id] = {ok: true}; });
            api.addEventListener('execution_error', e => { window.__paraRuns[e.detail.prompt_id] = {ok: false, error: e.detail}; });
            api.addEventListener('execution_interrupted', e => { window.__paraRuns[e.detail.prompt_id] = {ok: false, interrupted: true}; });
        }""")
        pg.screenshots = shots
        yield pg
        browser.close()


def _close_dialogs(pg) -> None:
    """Close what is open (1.49.6 opens the template browser on a fresh start; an earlier failure may leave a
    dialog): the next check starts from the canvas."""
    for _ in range(5):
        if pg.locator(".p-dialog:visible, [role='dialog']:visible").count() == 0:
            break
        pg.mouse.click(5, 500)  # focus the page, then Escape closes the dialog
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(300)


def _open_template(pg, name: str) -> None:
    """Templates -> Extensions -> comfyui-para -> the card of `name` (as a user does)."""
    _close_dialogs(pg)
    pg.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    pg.get_by_role("button", name="comfyui-para", exact=True).first.click()
    card = pg.locator(f"[data-testid='template-workflow-{name}']")
    card.wait_for(state="visible")
    card.scroll_into_view_if_needed()  # thumbnails load lazily: a card below the fold never loads its image
    if os.path.isfile(os.path.join(REPO_ROOT, "example_workflows", f"{name}.jpg")):  # the card shows our thumbnail
        pg.wait_for_function("el => [...el.querySelectorAll('img')].some(i => i.complete && i.naturalWidth === 384)",
                             arg=card.element_handle(), timeout=90_000)
        # whatever the front end lays over the thumbnail (1.49.6: a "Node graph" badge at the top left) ends above
        # the title drawn at TITLE_TOP
        badges = pg.evaluate("""el => { const img = [...el.querySelectorAll('img')].find(i => i.naturalWidth === 384);
            const r = img.getBoundingClientRect(), s = img.naturalHeight / r.height, out = [];
            for (const e of el.querySelectorAll('*')) {
                if (e === img || e.contains(img) || getComputedStyle(e).position !== 'absolute' || !(e.innerText || '').trim()) continue;
                const q = e.getBoundingClientRect();
                if (q.bottom <= r.top || q.top >= r.bottom || q.right <= r.left || q.left >= r.right) continue;
                out.push({text: e.innerText.trim(), bottom: (q.bottom - r.top) * s, right: (q.right - r.left) * s}); }
            return out; }""", card.element_handle())
        pg.badges = getattr(pg, "badges", []) + badges
        covering = [b for b in badges if b["bottom"] > THUMBNAILS.TITLE_TOP]
        assert not covering, f"{name}: the card's {covering} covers the thumbnail's title (drawn from y={THUMBNAILS.TITLE_TOP})"
    if not os.path.exists(os.path.join(pg.screenshots, "templates.png")):
        pg.screenshot(path=os.path.join(pg.screenshots, "templates.png"))
    card.click()
    # a template opened a second time gets a new tab named '<name> (2)'
    pg.wait_for_function("""name => { const f = window.app.extensionManager.workflow.activeWorkflow?.filename || '';
        return f === name || (f.startsWith(name + ' (') && /^ \\(\\d+\\)$/.test(f.slice(name.length))); }""", arg=name, timeout=30_000)
    pg.wait_for_timeout(1000)  # a missing-nodes/models dialog opens right after the graph is configured


def _run(pg, server) -> str:
    """Press Run; wait for the prompt; return its id. Fails with the server's error message."""
    before = set(pg.evaluate("Object.keys(window.__paraRuns)"))
    pg.get_by_role("button", name="Run", exact=True).first.click()
    pg.wait_for_function("n => Object.keys(window.__paraRuns).length > n", arg=len(before), timeout=150_000)
    runs = pg.evaluate("window.__paraRuns")
    (pid,) = set(runs) - before
    assert runs[pid]["ok"], f"the prompt failed in the browser: {json.dumps(runs[pid].get('error'))[:800]}"
    for _ in range(300):  # ComfyUI writes the history entry just after it sends execution_success
        if pid in server.get(f"/history/{pid}"):
            break
        pg.wait_for_timeout(100)
    return pid


def _shoot_node(pg, name: str, node_id: str) -> str:
    """A screenshot of one node at 100% zoom (LiteGraph hides widget text below 60%)."""
    box = pg.evaluate("""id => { const c = window.app.canvas, n = window.app.graph.getNodeById(Number(id));
        c.ds.scale = 1; c.centerOnNode(n); c.setDirty(true, true); c.draw(true, true);
        const [x, y] = window.app.canvasPosToClientPos([n.pos[0] - 10, n.pos[1] - 40]);
        return {x, y, width: n.size[0] + 20, height: n.size[1] + 50}; }""", node_id)
    pg.wait_for_timeout(300)
    path = os.path.join(pg.screenshots, f"{name}_node{node_id}.png")
    pg.screenshot(path=path, clip={k: max(0, v) for k, v in box.items()})
    return path


def _fit_and_shoot(pg, name: str, suffix: str) -> str:
    pg.evaluate("window.app.canvas.ds && window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    pg.wait_for_timeout(500)
    path = os.path.join(pg.screenshots, f"{name}_{suffix}.png")
    pg.screenshot(path=path)
    return path


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_in_the_browser(server, page, name):
    server.post("/free", {"unload_models": False, "free_memory": True})  # every node executes (no cache from an earlier workflow)
    _open_template(page, name)
    dialogs = page.locator(".p-dialog:visible")
    assert dialogs.count() == 0, f"{name}: a dialog opened on load: {dialogs.first.inner_text()[:300]!r}"
    body = page.evaluate("document.body.innerText")
    assert "Invalid workflow" not in body, f"{name}: the front end refuses part of the workflow: {body[body.index('Invalid workflow'):][:300]!r}"
    nodes = page.evaluate("""() => window.app.graph.nodes.map(n => ({id: String(n.id), type: n.type, title: n.title,
        known: !!LiteGraph.registered_node_types[n.type], widgets: (n.widgets || []).map(w => w.name)}))""")
    unknown = [n["type"] for n in nodes if not n["known"]]
    assert not unknown, f"{name}: node types the front end does not know: {unknown}"
    # as the front end lays the nodes out (sizes grown to fit their widgets, title bars included), none covers another
    rects = page.evaluate("() => window.app.graph.nodes.map(n => ({id: n.id, type: n.type, r: [...n.boundingRect]}))")
    covered = [(a["id"], a["type"], b["id"], b["type"]) for i, a in enumerate(rects) for b in rects[i + 1:]
               if min(a["r"][0] + a["r"][2], b["r"][0] + b["r"][2]) - max(a["r"][0], b["r"][0]) > 0
               and min(a["r"][1] + a["r"][3], b["r"][1] + b["r"][3]) - max(a["r"][1], b["r"][1]) > 0]
    assert not covered, f"{name}: overlapping nodes in the browser: {covered}"
    with open(os.path.join(REPO_ROOT, "example_workflows", f"{name}.json"), encoding="utf-8") as f:
        ckpts = [n["widgets_values"][0] for n in json.load(f)["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    _fit_and_shoot(page, name, "loaded")
    if any(c != RUNNABLE_CKPT for c in ckpts) or not ckpts:
        # SDXL / Flux workflows: the tiny SD1.5 checkpoint cannot stand in for their models here, so the browser
        # checks them as loaded; test_family_workflows.py runs them end to end on tiny SDXL / Flux models.
        assert name in ("para_train_sdxl_subject", "para_train_flux_subject"), f"{name} needs {ckpts or 'a model'}"
        return
    page.evaluate("""tiny => { for (const n of window.app.graph.nodes) for (const [k, v] of Object.entries(tiny[n.type] || {})) {
        const w = (n.widgets || []).find(w => w.name === k); if (w) { w.value = v; w.callback?.(v); } } }""", TINY)
    pid = _run(page, server)
    history = server.get(f"/history/{pid}")[pid]["outputs"]
    shown = page.evaluate("""name => Object.fromEntries(window.app.graph.nodes.map(n => [String(n.id),
        (n.widgets || []).find(w => w.name === name)?.value ?? null]))""", TEXT_WIDGET)
    _fit_and_shoot(page, name, "after_run")
    para_nodes = [n for n in nodes if n["type"].startswith("PaRa")]
    assert para_nodes
    for n in para_nodes:
        text = shown[n["id"]]
        assert text, f"{name}: {n['type']} '{n['title']}' (node {n['id']}) shows no text after the run"
        assert re.search(EXPECTED[n["type"]], text, re.S), f"{name}: {n['type']} shows {text!r}"
        assert history[n["id"]]["text"] == [text], f"{name}: node {n['id']} shows {text!r}, history has {history[n['id']]}"
        first_line = text.splitlines()[0][:40]
        _shoot_node(page, name, n["id"])
        # the node is centred at 100%: its text is in the page and visible (not only a widget value)
        assert page.get_by_text(first_line, exact=False).filter(visible=True).count() > 0, \
            f"{name}: '{first_line}' is not visible on the canvas"


def test_every_pack_node_is_registered_in_the_front_end(server, page):
    """The node library/search lists what the front end registered: every PaRa node, by its display name."""
    info = server.get("/object_info")
    ours = {k: v["display_name"] for k, v in info.items() if v.get("python_module", "").endswith("comfyui-para")}
    assert {"PaRaLoader", "PaRaLoadFile", "PaRaApply", "PaRaMerge", "PaRaLoRACombine", "PaRaSave", "PaRaHook", "PaRaTrainer"} <= set(ours)
    registered = page.evaluate("""ids => Object.fromEntries(ids.map(id => [id, LiteGraph.registered_node_types[id]?.title ?? null]))""", list(ours))
    assert registered == ours


def _text_box(pg, node_id: str):
    """The progress-text widget of a node as the page lays it out: its text, and whether it is clipped (a DOM
    textarea whose content is taller than its box)."""
    return pg.evaluate("""([id, name]) => { const n = window.app.graph.getNodeById(Number(id));
        const w = (n.widgets || []).find(w => w.name === name); if (!w) return null;
        const e = w.element || w.inputEl || null;
        return {value: w.value ?? null, dom: !!e, scroll: e ? e.scrollHeight : null, client: e ? e.clientHeight : null,
                node: [...n.size], computed: [...n.computeSize()]}; }""", [node_id, TEXT_WIDGET])


def _clipped_lines(pg, text: str):
    """Where the page cuts off `text` as its DOM draws it: [] when the whole text is visible, else
    [[text top, text bottom, visible top, visible bottom]] for each place an ancestor with overflow other than
    visible (a scroll box, a clip) shows less than the text's box. Fails if the text is not in the DOM."""
    res = pg.evaluate("""t => {
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        const els = new Set(); let n;
        while ((n = walker.nextNode())) if (n.textContent.includes(t.slice(0, 20))) els.add(n.parentElement);
        if (!els.size) return null;
        const out = [];
        for (const el of els) {
            const r = el.getBoundingClientRect(); let bottom = Infinity, top = -Infinity;
            for (let e = el.parentElement; e; e = e.parentElement) {
                const st = getComputedStyle(e);
                if (st.overflowY !== 'visible') { const q = e.getBoundingClientRect(); bottom = Math.min(bottom, q.bottom); top = Math.max(top, q.top); }
            }
            if (r.bottom > bottom + 1 || r.top < top - 1) out.push([r.top, r.bottom, top, bottom]);
        }
        return out; }""", text)
    assert res is not None, f"the text {text[:40]!r} is not in the page's DOM"
    return res


def test_train_para_summary_with_a_preview_is_fully_visible(server, page):
    """Train PaRa with preview_every: the preview image and the whole summary (not 2 of its 4 lines)."""
    server.post("/free", {"unload_models": False, "free_memory": True})
    _open_template(page, "para_train_subject")
    tiny = dict(TINY, PaRaTrainer=dict(TINY["PaRaTrainer"], preview_every=1))
    page.evaluate("""tiny => { for (const n of window.app.graph.nodes) for (const [k, v] of Object.entries(tiny[n.type] || {})) {
        const w = (n.widgets || []).find(w => w.name === k); if (w) { w.value = v; w.callback?.(v); } } }""", tiny)
    pid = _run(page, server)
    tr = next(n for n in page.evaluate("window.app.graph.nodes.map(n => ({id: String(n.id), type: n.type}))") if n["type"] == "PaRaTrainer")
    history = server.get(f"/history/{pid}")[pid]["outputs"][tr["id"]]
    assert history.get("images"), "no preview image in the history"
    page.wait_for_timeout(1000)
    box = _text_box(page, tr["id"])
    _shoot_node(page, "train_preview", tr["id"])
    assert box["value"] == history["text"][0]
    assert _clipped_lines(page, box["value"]) == [], f"Train PaRa's summary is cut off beside the preview: {_clipped_lines(page, box['value'])}"
    assert page.evaluate("id => (window.app.graph.getNodeById(Number(id)).imgs || []).length", tr["id"]) > 0 or \
        page.locator("img[src*='/view']").count() > 0, "the preview image is not shown"


def _node_text(pg, node_id: str):
    return pg.evaluate("([id, name]) => (window.app.graph.getNodeById(Number(id)).widgets || []).find(w => w.name === name)?.value ?? null",
                       [node_id, TEXT_WIDGET])


def _set_widgets(pg, values: dict) -> None:
    pg.evaluate("""tiny => { for (const n of window.app.graph.nodes) for (const [k, v] of Object.entries(tiny[n.type] || {})) {
        const w = (n.widgets || []).find(w => w.name === k); if (w) { w.value = v; w.callback?.(v); } } }""", values)


def test_cancel_leaves_a_word_on_train_para(server, page):
    """Cancel during training: the node says it was cancelled, at which step, and the checkpoint it kept
    (not the last 'step 5/200 loss ...')."""
    server.post("/free", {"unload_models": False, "free_memory": True})
    _open_template(page, "para_train_subject")
    _set_widgets(page, dict(TINY, PaRaTrainer=dict(TINY["PaRaTrainer"], steps=400, save_every=1)))
    tr = page.evaluate("window.app.graph.nodes.find(n => n.type === 'PaRaTrainer').id")
    before = set(page.evaluate("Object.keys(window.__paraRuns)"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    page.wait_for_function("""([id, name]) => /^step ([3-9]|\\d\\d+)\\/400/.test((window.app.graph.getNodeById(id).widgets || [])
        .find(w => w.name === name)?.value || '')""", arg=[tr, TEXT_WIDGET], timeout=150_000)
    page.evaluate("window.app.extensionManager.command.execute('Comfy.Interrupt')")  # the Cancel button's command
    page.wait_for_function("n => Object.keys(window.__paraRuns).length > n", arg=len(before), timeout=60_000)
    runs = page.evaluate("window.__paraRuns")
    (pid,) = set(runs) - before
    assert runs[pid].get("interrupted"), runs[pid]
    page.wait_for_timeout(500)
    text = _node_text(page, str(tr))
    m = re.fullmatch(r"cancelled at step (\d+)/400\nkept (para/sks_dog_(\d+)_steps_\d{5}_\.safetensors)\n"
                     r"\(continue it with existing_para\)", text or "")
    assert m, f"Train PaRa shows {text!r} after Cancel"
    assert int(m.group(1)) >= 3 and int(m.group(3)) == int(m.group(1)), text  # save_every 1: the file of the last step
    assert os.path.isfile(os.path.join(server.base, "output", m.group(2))), m.group(2)
    _shoot_node(page, "train_cancelled", str(tr))
    assert page.get_by_text("cancelled at step", exact=False).filter(visible=True).count() > 0


def _errors_text(pg) -> str:
    """The page's text after opening the front end's error report where it has one (1.49.6: "View details"
    opens the Errors panel), else as it is."""
    details = pg.get_by_role("button", name="View details")
    if details.count() and details.first.is_visible():
        details.first.click()
        pg.wait_for_timeout(1000)
    return pg.evaluate("document.body.innerText")


def _run_refused(pg, shot: str, message: str) -> None:
    """Press Run on a prompt ComfyUI's validation refuses: the page shows `message` (the node's validation
    message, in the error dialog or the Errors panel; opened with "View details" where the front end has it)."""
    before = pg.evaluate("Object.keys(window.__paraRuns).length")
    pg.get_by_role("button", name="Run", exact=True).first.click()
    try:
        pg.wait_for_function("m => document.body.innerText.includes(m)", arg=message, timeout=20_000)
    except Exception:  # 1.49.6: the Errors panel lists "Load PaRa - para_name"; its (i) button expands the message
        text = _errors_text(pg)
        for info in pg.locator("button[aria-label^='Info for'][aria-expanded='false']").all():  # expands the details
            info.click()
            pg.wait_for_timeout(500)
        text = pg.evaluate("document.body.innerText")
        pg.screenshot(path=os.path.join(pg.screenshots, f"{shot}.png"))
        assert message in text, f"Run: the page does not show {message!r}:\n{text[-1500:]}"
    pg.screenshot(path=os.path.join(pg.screenshots, f"{shot}.png"))
    assert pg.evaluate("Object.keys(window.__paraRuns).length") == before, "the refused prompt ran"


def test_a_missing_para_file_is_reported_in_the_para_folder(server, page):
    """A shared workflow whose PaRa file is not here: where the front end lists missing models (1.49.6's Errors
    panel) it is under 'para', not 'Unknown' (web/para_nodes.js); Run is refused by validation, naming the file
    and the folders."""
    with open(os.path.join(REPO_ROOT, "example_workflows", "para_personalised_generation.json"), encoding="utf-8") as f:
        wf = json.load(f)
    loader = next(n for n in wf["nodes"] if n["type"] == "PaRaLoader")
    loader["widgets_values"][0] = "absent_para.safetensors"
    page.wait_for_timeout(1000)
    _close_dialogs(page)
    page.evaluate("wf => window.app.loadGraphData(wf)", wf)
    page.wait_for_timeout(2000)
    text = _errors_text(page)
    page.screenshot(path=os.path.join(page.screenshots, "missing_para_loaded.png"))
    if "absent_para.safetensors" in text:  # a front end that reports missing models on load (1.49.6)
        assert re.search(r"absent_para\.safetensors\s*\n\s*para\s*\n", text), text[-1500:]
        assert "Unknown" not in text, text[-1500:]
    _run_refused(page, "missing_para_run", "Load PaRa: PaRa file 'absent_para.safetensors' not found in the para folders")


def test_load_para_without_any_para_file_shows_a_placeholder(server, comfy, page, tmp_path):
    """No PaRa file at all: a Load PaRa added from the node library shows a placeholder (not `undefined`), and
    Run says what to do."""
    folders = [comfy.dirs["para"], os.path.join(server.base, "output", "para")]
    moved = []
    try:
        for i, folder in enumerate(folders):
            if os.path.isdir(folder):
                dest = os.path.join(str(tmp_path), str(i))
                shutil.move(folder, dest)
                moved.append((dest, folder))
                os.makedirs(folder)
        assert server.get("/models/para") == []
        _open_template(page, "para_personalised_generation")
        page.evaluate("window.app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')")
        page.wait_for_timeout(2000)
        value = page.evaluate("""() => { const n = LiteGraph.createNode('PaRaLoader'); window.app.graph.add(n);
            const v = n.widgets.find(w => w.name === 'para_name').value; window.app.graph.remove(n); return v ?? null; }""")
        assert value == "no PaRa file yet (put one in models/para)", value
        page.evaluate("""v => { const n = window.app.graph.nodes.find(n => n.type === 'PaRaLoader');
            const w = n.widgets.find(w => w.name === 'para_name'); w.value = v; w.callback?.(v); }""", value)
        _run_refused(page, "no_para_file_run", "Load PaRa: no PaRa file chosen")
    finally:
        for dest, folder in moved:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(dest, folder)
        page.evaluate("window.app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')")
