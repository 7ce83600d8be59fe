// The review table: sorts, filters and pages the rows embedded as JSON in the page. The state lives in the
// address (#category=...&decision=...&correct=...&sort=...&size=...&page=...), so a filtered view can be
// bookmarked or sent. Text goes in with textContent, links were URL-quoted when the page was written.
(function () {
  "use strict";
  var errors = document.getElementById("script-errors");
  window.addEventListener("error", function (event) {
    errors.hidden = false;
    errors.textContent = "The review table could not be drawn: " + event.message;
  });

  var data = JSON.parse(document.getElementById("review-data").textContent);
  var rows = data.rows;
  var labelled = data.labelled;
  rows.forEach(function (row, index) { row.i = index + 1; });
  var defaults = { category: "", decision: "", correct: "", sort: "score", size: "100", page: "1" };
  var controls = {
    category: document.getElementById("filter-category"),
    decision: document.getElementById("filter-decision"),
    correct: document.getElementById("filter-correct"),
    sort: document.getElementById("sort"),
    size: document.getElementById("page-size")
  };
  var body = document.getElementById("rows");
  var shown = document.getElementById("shown");
  var pageNumber = document.getElementById("page-number");

  function readState() {
    var params = new URLSearchParams(window.location.hash.slice(1));
    var state = {};
    Object.keys(defaults).forEach(function (key) {
      state[key] = params.has(key) ? params.get(key) : defaults[key];
    });
    return state;
  }

  function writeState(state) {
    var params = new URLSearchParams();
    Object.keys(defaults).forEach(function (key) {
      if (state[key] !== defaults[key]) { params.set(key, state[key]); }
    });
    window.location.hash = params.toString();
  }

  function decisionOf(row) {
    if (row.e) { return "failed"; }
    if (row.d === null) { return "undecided"; }
    return row.d ? "anomalous" : "normal";
  }

  function matches(row, state) {
    if (state.category && row.c !== state.category) { return false; }
    if (state.decision && decisionOf(row) !== state.decision) { return false; }
    if (!state.correct) { return true; }
    if (state.correct === "correct") { return row.o === "TP" || row.o === "TN"; }
    if (state.correct === "wrong") { return row.o === "FP" || row.o === "FN"; }
    return row.o === state.correct;
  }

  // unreadable images first (they need a look whatever the order), rows without the sort key last
  function orderBy(state) {
    function key(row) {
      if (state.sort === "score") { return row.s === null ? null : -row.s; }
      if (state.sort === "score-up") { return row.s; }
      if (state.sort === "distance") { return row.s === null || row.t === null ? null : Math.abs(row.s - row.t); }
      return null;
    }
    return function (a, b) {
      if (!!a.e !== !!b.e) { return a.e ? -1 : 1; }
      if (state.sort === "name") { return a.n < b.n ? -1 : a.n > b.n ? 1 : 0; }
      var ka = key(a), kb = key(b);
      if (ka === kb) { return a.i - b.i; }
      if (ka === null) { return 1; }
      if (kb === null) { return -1; }
      return ka - kb;
    };
  }

  function cell(tr, text, className) {
    var td = document.createElement("td");
    if (text !== undefined && text !== null) { td.textContent = text; }
    if (className) { td.className = className; }
    tr.appendChild(td);
    return td;
  }

  function picture(tr, thumbnail, target, alt) {
    var td = cell(tr);
    if (!thumbnail) { return; }
    var link = document.createElement("a");
    link.href = target || thumbnail;
    link.target = "_blank";
    var img = document.createElement("img");
    img.src = thumbnail;
    img.alt = alt;
    img.loading = "lazy";
    link.appendChild(img);
    td.appendChild(link);
  }

  function number(value) {
    return value === null ? "—" : Number(value).toPrecision(4);
  }

  function drawRow(row) {
    var tr = document.createElement("tr");
    tr.className = "row" + (row.o ? " outcome-" + row.o : "") + (row.e ? " failed" : "");
    tr.dataset.name = row.n;
    tr.dataset.category = row.c;
    tr.dataset.decision = decisionOf(row);
    if (row.o) { tr.dataset.outcome = row.o; }
    cell(tr, String(row.i));
    picture(tr, row.th, row.ov, "image " + row.n);
    picture(tr, row.ot, row.ov, "overlay " + row.n);
    var nameCell = cell(tr);
    if (row.src) {
      var link = document.createElement("a");
      link.href = row.src;
      link.textContent = row.n;
      nameCell.appendChild(link);
    } else {
      nameCell.textContent = row.n;
    }
    cell(tr, row.c);
    if (row.e) {
      var reason = cell(tr, "could not be read: " + row.e, "reason");
      reason.colSpan = labelled ? 6 : 4;
      return tr;
    }
    cell(tr, number(row.s), "number");
    cell(tr, number(row.t), "number");
    cell(tr, row.t === null ? "—" : (row.s - row.t >= 0 ? "+" : "") + (row.s - row.t).toPrecision(3), "number");
    cell(tr, decisionOf(row), "decision-" + decisionOf(row));
    if (labelled) {
      cell(tr, row.y === null ? "—" : row.y ? "defective" : "normal");
      cell(tr, row.o || "—", row.o ? "outcome outcome-" + row.o : "");
    }
    return tr;
  }

  function render() {
    var state = readState();
    Object.keys(controls).forEach(function (key) {
      if (controls[key]) { controls[key].value = state[key]; }
    });
    var selected = rows.filter(function (row) { return matches(row, state); });
    selected.sort(orderBy(state));
    var size = Math.max(1, parseInt(state.size, 10) || 100);
    var pages = Math.max(1, Math.ceil(selected.length / size));
    var page = Math.min(pages, Math.max(1, parseInt(state.page, 10) || 1));
    var first = (page - 1) * size;
    var fragment = document.createDocumentFragment();
    selected.slice(first, first + size).forEach(function (row) { fragment.appendChild(drawRow(row)); });
    body.replaceChildren(fragment);
    shown.dataset.matching = String(selected.length);
    shown.textContent = selected.length === 0
      ? "No image matches these filters (of " + rows.length + ")."
      : "Showing " + (first + 1) + "–" + Math.min(first + size, selected.length) + " of " + selected.length +
        " matching images (of " + rows.length + ").";
    pageNumber.textContent = "page " + page + " of " + pages;
    document.getElementById("previous").disabled = page <= 1;
    document.getElementById("next").disabled = page >= pages;
  }

  function update(changes) {
    var state = readState();
    Object.keys(changes).forEach(function (key) { state[key] = changes[key]; });
    writeState(state);
  }

  Object.keys(controls).forEach(function (key) {
    if (!controls[key]) { return; }
    controls[key].addEventListener("change", function () {
      var changes = { page: "1" };
      changes[key] = controls[key].value;
      update(changes);
    });
  });
  document.getElementById("previous").addEventListener("click", function () {
    update({ page: String(parseInt(readState().page, 10) - 1) });
  });
  document.getElementById("next").addEventListener("click", function () {
    update({ page: String((parseInt(readState().page, 10) || 1) + 1) });
  });
  window.addEventListener("hashchange", render);
  render();
}());
