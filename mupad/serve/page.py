"""The one page of `mupad serve`: plain HTML rendered for the checkpoint, a little script.

Only the checkpoint's conditions get inputs. Every value from the checkpoint is escaped;
the script writes server replies with textContent only. Nothing loads from the network
(the Content-Security-Policy allows this origin only).
"""

from __future__ import annotations

from html import escape
from typing import Any

_UNITS = 2**20


def _options(values: list[str], default: str) -> str:
    return "".join(
        f'<option value="{escape(v)}"{" selected" if v == default else ""}>{escape(v)}</option>'
        for v in values
    )


def _text_section(info: dict[str, Any]) -> str:
    limit = info["limits"]["max_caption_chars"]
    picker = ""
    if info["captions"]:
        # A <select> rather than a <datalist>: datalists do not attach to a <textarea>.
        choices = "".join(
            f'<option value="{escape(c)}">{escape(c)}</option>' for c in info["captions"]
        )
        picker = f"""
  <label for="caption-pick">or start from a caption the model was trained with</label>
  <select id="caption-pick"><option value="">(choose)</option>{choices}</select>"""
    return f"""
<fieldset id="text-section"><legend>Caption (text condition)</legend>
  <label for="text">Caption</label>
  <textarea id="text" name="text" rows="2" maxlength="{limit}"
    placeholder="H&amp;E histology: tumor"></textarea>{picker}
</fieldset>"""


def _image_section(info: dict[str, Any]) -> str:
    groups: dict[str, list[str]] = {}
    for key in info["tiles"]:
        groups.setdefault(key.split("/")[0], []).append(key)
    options = "".join(
        f'<optgroup label="{escape(group)}">'
        + "".join(
            f'<option value="{escape(k)}">{escape(k.split("/", 1)[1])}</option>' for k in keys
        )
        + "</optgroup>"
        for group, keys in groups.items()
    )
    accept = ",".join(info["upload_suffixes"]["image"])
    return f"""
<fieldset id="image-section"><legend>Reference tile (image condition)</legend>
  <label for="tile">Bundled Kather 2016 tile</label>
  <select id="tile" name="tile"><option value="">(none)</option>{options}</select>
  <label for="image">or upload a tile</label>
  <input id="image" name="image" type="file" accept="{escape(accept)}">
  <label for="image_mpp">µm/px of the reference (optional)</label>
  <input id="image_mpp" name="image_mpp" type="number" step="any" min="0.001">
  <img id="reference-preview" alt="reference preview" hidden>
  <p class="hint">The centre {info["tile_px"]} px square is used (resampled first when the
  µm/px of the image and of the model are known).</p>
</fieldset>"""


def _rna_section(info: dict[str, Any]) -> str:
    accept = ",".join(info["upload_suffixes"]["rna"])
    return f"""
<fieldset id="rna-section"><legend>Expression profile (RNA condition)</legend>
  <label for="rna">File</label>
  <input id="rna" name="rna" type="file" accept="{escape(accept)}">
  <span role="radiogroup" aria-label="file kind">
    <label><input type="radio" name="rna_kind" value="scores" checked> pathway scores</label>
    <label><input type="radio" name="rna_kind" value="expression"> gene expression</label>
  </span>
  <label for="rna_row">Row / sample (multi-row files)</label>
  <input id="rna_row" name="rna_row" type="text" maxlength="200">
</fieldset>"""


def render_page(info: dict[str, Any]) -> str:
    """The HTML page for a checkpoint described by `GenerationService.describe()`."""
    limits, defaults, streams = info["limits"], info["defaults"], info["streams"]
    sections = {"text": _text_section, "image": _image_section, "rna": _rna_section}
    conditions = "".join(sections[name](info) for name in streams)
    if not conditions:
        conditions = "<p>This checkpoint is unconditional: it takes no conditions.</p>"
    mpp = f"{info['model_mpp']:g} µm/px" if info["model_mpp"] else "µm/px unknown"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mupad — generate H&amp;E tiles</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>mupad — generate H&amp;E tiles</h1>
  <p id="model">Checkpoint <code>{escape(info["checkpoint"])}</code>:
  conditions <strong>{escape(", ".join(streams) or "none")}</strong>,
  {info["tile_px"]} px tiles, {escape(mpp)}, on {escape(info["device"])}.</p>
</header>
<main>
<form id="generate-form" data-max-upload="{limits["max_upload_bytes"]}">
{conditions}
<fieldset id="sampling"><legend>Sampling</legend>
  <label for="guidance">Guidance scale</label>
  <input id="guidance" name="guidance" type="number" step="0.1" min="0"
    max="{limits["max_guidance"]}" value="{defaults["guidance"]}">
  <label for="guidance_schedule">Guidance schedule</label>
  <select id="guidance_schedule" name="guidance_schedule">
    {_options(info["guidance_schedules"], defaults["guidance_schedule"])}</select>
  <label for="sampler">Sampler</label>
  <select id="sampler" name="sampler">{_options(info["samplers"], defaults["sampler"])}</select>
  <label for="steps">Steps (≤ {limits["max_steps"]})</label>
  <input id="steps" name="steps" type="number" min="1" max="{limits["max_steps"]}"
    value="{defaults["steps"]}" required>
  <label for="num_images">Images (≤ {limits["max_images"]})</label>
  <input id="num_images" name="num_images" type="number" min="1" max="{limits["max_images"]}"
    value="{defaults["num_images"]}" required>
  <label for="seed">Seed (blank = random)</label>
  <input id="seed" name="seed" type="number" min="0" step="1">
  <p class="hint">Linear schedule: the scale anneals to 0 over the trajectory (the paper's
  2.5 → 0). Uploads up to {limits["max_upload_bytes"] / _UNITS:g} MB in all.</p>
</fieldset>
<button id="generate" type="submit">Generate</button>
<p id="status" role="status"></p>
<p id="error" role="alert" hidden></p>
</form>
<section id="results" aria-live="polite"></section>
</main>
</body>
</html>
"""


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem; }
fieldset { margin: 0 0 1rem; border: 1px solid #ccc; border-radius: 6px; }
label { display: block; margin-top: .5rem; font-size: .9rem; }
textarea, select, input[type=text], input[type=number] { width: 100%; max-width: 30rem; }
.hint { color: #555; font-size: .85rem; }
#error { color: #a00; font-weight: bold; white-space: pre-wrap; }
#results { display: flex; flex-wrap: wrap; gap: 1rem; }
figure.result { margin: 0; text-align: center; }
figure.result img, #reference-preview { width: 192px; height: 192px;
  image-rendering: pixelated; border: 1px solid #ccc; display: block; }
button { font-size: 1rem; padding: .4rem 1.2rem; }
"""


SCRIPT = """
"use strict";
(function () {
  const form = document.getElementById("generate-form");
  const button = document.getElementById("generate");
  const status = document.getElementById("status");
  const error = document.getElementById("error");
  const results = document.getElementById("results");
  const tile = document.getElementById("tile");
  const image = document.getElementById("image");
  const preview = document.getElementById("reference-preview");

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  function showPreview(url) {
    if (!preview) return;
    preview.hidden = !url;
    if (url) preview.src = url; else preview.removeAttribute("src");
  }

  const captionPick = document.getElementById("caption-pick");
  if (captionPick) captionPick.addEventListener("change", function () {
    if (captionPick.value) document.getElementById("text").value = captionPick.value;
  });
  if (tile) tile.addEventListener("change", function () {
    if (tile.value) {
      image.value = "";
      showPreview("/api/tiles/" + tile.value.split("/").map(encodeURIComponent).join("/"));
    }
    else showPreview("");
  });
  if (image) image.addEventListener("change", function () {
    if (image.files.length) { tile.value = ""; showPreview(URL.createObjectURL(image.files[0])); }
    else showPreview("");
  });

  function formData() {
    const data = new FormData();
    let bytes = 0;
    for (const [name, value] of new FormData(form)) {
      if (value instanceof File) {
        if (!value.name && !value.size) continue;
        bytes += value.size;
      } else if (!String(value).trim()) continue;
      data.append(name, value);
    }
    const rna = document.getElementById("rna");
    if (!rna || !rna.files.length) data.delete("rna_kind");
    return [data, bytes];
  }

  function link(href, text, filename) {
    const a = document.createElement("a");
    a.href = href; a.textContent = text; a.download = filename;
    return a;
  }

  function showResults(body) {
    results.replaceChildren();
    for (const item of body.images) {
      const figure = document.createElement("figure");
      figure.className = "result";
      const img = document.createElement("img");
      img.className = "generated";
      img.alt = "generated tile, seed " + item.seed;
      img.src = item.png_url;
      const caption = document.createElement("figcaption");
      const seed = document.createElement("span");
      seed.className = "seed";
      seed.textContent = String(item.seed);
      caption.append("seed ", seed, " · ",
        link(item.png_url, "PNG", "mupad_seed" + item.seed + ".png"), " · ",
        link(item.sidecar_url, "JSON", "mupad_seed" + item.seed + ".json"));
      figure.append(img, caption);
      results.append(figure);
    }
    status.textContent = body.images.length + " tile(s) in " + body.elapsed_s + " s; seed " +
      body.seed + (body.random_seed ? " (random)" : "") + "; conditions: " +
      (body.modalities.join(", ") || "none");
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    showError("");
    const [data, bytes] = formData();
    const limit = Number(form.dataset.maxUpload);
    if (bytes > limit) {
      showError("the files are larger than the upload limit of " + (limit / 1048576) + " MB");
      return;
    }
    button.disabled = true;
    status.textContent = "generating…";
    try {
      const response = await fetch("/api/generate", { method: "POST", body: data });
      const body = await response.json().catch(function () { return {}; });
      if (!response.ok) {
        status.textContent = "";
        showError(body.detail ? String(body.detail) : "error " + response.status);
        return;
      }
      showResults(body);
    } catch (failure) {
      status.textContent = "";
      showError("the server did not answer: " + failure);
    } finally {
      button.disabled = false;
    }
  });
})();
"""
