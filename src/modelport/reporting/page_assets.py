"""The report's stylesheet and script, inlined into every page.

The page's Content-Security-Policy allows exactly these two texts (by their sha256) and
nothing else: no network, no other inline script or style. So even a file name that slipped
past escaping could not run, and the page makes no request wherever it is opened.

The script sorts and filters the tables by the page's own JSON data (each table names the
records its rows show, one per row, and each column the field it sorts by), renders only the
rows asked for from their server-rendered HTML (kept as JSON strings), and opens or closes
every node of a module tree. It writes nothing that did not come from the page itself. The
page reads without it, tables cut to their first rows.
"""

from __future__ import annotations

from typing import Final

CSS: Final = """
:root { color-scheme: light dark; --fg: #1d232a; --bg: #fff; --dim: #68717c; --line: #d8dde3;
  --head: #f3f5f7; --ok: #1f7a3a; --warn: #9a6200; --bad: #b3261e; --neg: #3b6fb6;
  --pos: #c0562b; --zero: #8a8f96; }
@media (prefers-color-scheme: dark) { :root { --fg: #e4e7eb; --bg: #16191d; --dim: #9aa3ad;
  --line: #343a42; --head: #21262c; --neg: #78a6e6; --pos: #f08a5d; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1500px; padding: 0 1.2rem 3rem; color: var(--fg);
  background: var(--bg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { border-bottom: 1px solid var(--line); padding: 1rem 0 .6rem; }
h1 { font-size: 1.35rem; margin: 0 0 .3rem; word-break: break-all; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
nav a { margin-right: 1rem; color: inherit; }
code, pre, td.num, .mono { font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; }
pre { white-space: pre-wrap; word-break: break-all; max-height: 28rem; overflow: auto;
  background: var(--head); padding: .5rem; margin: 0; }
table { border-collapse: collapse; margin: .3rem 0; }
th, td { border: 1px solid var(--line); padding: 2px 6px; text-align: left;
  vertical-align: top; }
thead th { background: var(--head); position: sticky; top: 0; z-index: 1; white-space: nowrap; }
table.kv > tbody > tr > th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-size: 12px; }
td.name { overflow-wrap: anywhere; min-width: 18rem; }
.scroll th, .scroll td { padding: 1px 4px; }
.dim, .more { color: var(--dim); }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(30rem, 1fr));
  gap: 1.5rem; }
.verdict { display: inline-block; padding: 1px 8px; border-radius: 3px; color: #fff;
  font-weight: 600; }
.verdict.safe { background: var(--ok); }
.verdict.suspicious { background: var(--warn); }
.verdict.unsafe, .verdict.error { background: var(--bad); }
.verdict.fits { background: var(--ok); }
.verdict.misfit { background: var(--bad); }
.flag { display: inline-block; padding: 0 5px; margin: 1px 2px 1px 0; border-radius: 3px;
  border: 1px solid var(--bad); color: var(--bad); font-size: 12px; white-space: nowrap; }
ul.tree, ul.tree ul { list-style: none; padding-left: 1.1rem; margin: 0; }
ul.tree { padding-left: 0; }
ul.tree summary { cursor: pointer; }
li.leaf { padding-left: 1.05rem; color: var(--dim); }
li.leaf code { color: var(--fg); }
.mod { font-weight: 600; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button::after { content: " \\2195"; color: var(--dim); }
th[aria-sort=ascending] button::after { content: " \\2191"; color: var(--fg); }
th[aria-sort=descending] button::after { content: " \\2193"; color: var(--fg); }
.controls { display: flex; gap: 1rem; align-items: center; margin: .4rem 0; flex-wrap: wrap; }
.controls input[type=search] { width: 22rem; padding: 3px 6px; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid var(--line); }
.scroll table { margin: 0; }
svg.spark { display: block; }
svg.spark .n { fill: var(--neg); }
svg.spark .p { fill: var(--pos); }
svg.spark .z { fill: var(--zero); }
svg.heat text { font-size: 10px; fill: var(--fg); }
"""

JS: Final = """
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("modelport-data").textContent);
  var tables = {};
  function resolve(path) {
    return path.split(".").reduce(function (found, key) {
      return found === null || found === undefined ? found : found[key];
    }, data);
  }
  function numeric(value) {
    if (typeof value === "number") { return value; }
    if (value === "inf") { return Infinity; }
    if (value === "-inf") { return -Infinity; }
    return NaN;  // null (not computed), "nan": sorted last
  }
  function key(record, field, isNumber) {
    var value = record[field];
    if (field === "shape") {
      return value.reduce(function (a, b) { return a * b; }, 1);
    }
    if (Array.isArray(value)) { value = value.join(" "); }
    if (typeof value === "boolean") { value = value ? "yes" : "no"; }
    if (isNumber) { return numeric(value); }
    return value === null || value === undefined ? "" : String(value).toLowerCase();
  }
  function setUp(table) {
    var records = resolve(table.getAttribute("data-records")) || [];
    var rows = JSON.parse(document.getElementById(table.getAttribute("data-rows")).textContent);
    var counter = document.getElementById(table.id.replace("table-", "count-"));
    var words = records.map(function (r) {
      return [r.name, r.dtype || r.dtype_a || "", r.dtype_b || "", (r.flags || []).join(" ")]
        .join(" ").toLowerCase();
    });
    var state = { order: records.map(function (_, i) { return i; }), terms: [], flagged: false,
      limit: table.tBodies[0].rows.length || 200 };
    function matching() {
      return state.order.filter(function (i) {
        if (state.flagged && !(records[i].flags && records[i].flags.length)) { return false; }
        return state.terms.every(function (term) { return words[i].indexOf(term) >= 0; });
      });
    }
    function render() {
      var found = matching();
      var shown = found.slice(0, state.limit);
      table.tBodies[0].innerHTML = shown.map(function (i) { return rows[i]; }).join("");
      counter.textContent = shown.length + " of " + found.length + " shown" +
        (found.length < rows.length ? " (" + rows.length + " in all)" : "");
    }
    function sortBy(th) {
      var field = th.getAttribute("data-field");
      var isNumber = th.getAttribute("data-type") === "num";
      var down = th.getAttribute("aria-sort") === "ascending";
      var keys = records.map(function (r) { return key(r, field, isNumber); });
      state.order.sort(function (a, b) {
        var x = keys[a], y = keys[b];
        if (isNumber && (isNaN(x) || isNaN(y))) {
          if (isNaN(x) && isNaN(y)) { return a - b; }
          return isNaN(x) ? 1 : -1;
        }
        if (x < y) { return down ? 1 : -1; }
        if (x > y) { return down ? -1 : 1; }
        return a - b;
      });
      table.querySelectorAll("thead th").forEach(function (other) {
        other.removeAttribute("aria-sort");
      });
      th.setAttribute("aria-sort", down ? "descending" : "ascending");
      render();
    }
    table.querySelectorAll("thead th[data-field]").forEach(function (th) {
      th.querySelector("button").addEventListener("click", function () { sortBy(th); });
    });
    tables[table.id] = {
      filter: function (text, flagged) {
        state.terms = text.trim().toLowerCase().split(/\\s+/).filter(Boolean);
        state.flagged = flagged;
        render();
      },
      more: function (step) { state.limit = step > 0 ? state.limit + step : rows.length; render(); }
    };
  }
  document.querySelectorAll("table.sortable").forEach(setUp);
  document.querySelectorAll("input.filter").forEach(function (input) {
    var id = input.getAttribute("data-table");
    var flagged = document.getElementById(id.replace("table-", "flagged-"));
    function apply() { tables[id].filter(input.value, flagged !== null && flagged.checked); }
    input.addEventListener("input", apply);
    if (flagged !== null) { flagged.addEventListener("change", apply); }
  });
  document.querySelectorAll("button.more").forEach(function (button) {
    button.addEventListener("click", function () {
      tables[button.getAttribute("data-table")].more(Number(button.getAttribute("data-step")));
    });
  });
  document.querySelectorAll("button[data-tree]").forEach(function (button) {
    button.addEventListener("click", function () {
      var tree = document.getElementById(button.getAttribute("data-tree"));
      var open = button.getAttribute("data-open") === "1";
      tree.querySelectorAll("details").forEach(function (node) { node.open = open; });
    });
  });
})();
"""
