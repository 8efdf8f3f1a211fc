// The search page's only script: send the form to /search and show the JSON answer.
"use strict";
(function () {
  const form = document.getElementById("search");
  const list = document.getElementById("results");
  const status = document.getElementById("status");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // textContent: results can never inject markup
    return node;
  }

  function show(data) {
    list.replaceChildren();
    status.className = "status";
    status.textContent = data.count ? `${data.count} תוצאות (${data.took_ms} ms)` : "לא נמצאו תוצאות";
    for (const r of data.results) {
      const li = el("li", "result");
      const title = el("strong", "title", r.title);
      li.append(title, el("span", "score", r.score.toFixed(3)));
      if (r.body) li.append(el("p", "body", r.body));
      const matched = new Set((r.matched_tags || []).map((t) => t.name));
      const tags = el("div", "tags");
      for (const name of r.tags) tags.append(el("span", matched.has(name) ? "tag matched" : "tag", name));
      li.append(tags);
      list.append(li);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const params = new URLSearchParams({ q: form.q.value, mode: form.mode.value });
    status.className = "status";
    status.textContent = "מחפש…";
    try {
      const response = await fetch(`/search?${params}`, { headers: { Accept: "application/json" } });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
      show(data);
    } catch (error) {
      list.replaceChildren();
      status.className = "status error";
      status.textContent = `שגיאה: ${error.message}`;
    }
  });
})();
