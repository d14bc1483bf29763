// Keyboard shortcuts. Generate & rate: 1-5 rate the shown sample, <- and -> move between samples.
// Compare: <- left better, -> right better, up both good, down both bad, S skip.
// Keys only act on the visible tab, and never while the focus is in a text field.
(() => {
  const visible = (id) => {
    const el = document.getElementById(id);
    return el !== null && el.offsetParent !== null;
  };
  const click = (id) => {
    const el = document.getElementById(id);
    if (el && !el.disabled) { el.click(); return true; }
    return false;
  };
  const typing = (target) => {
    if (!target) return false;
    const tag = (target.tagName || "").toLowerCase();
    return tag === "textarea" || tag === "select" || target.isContentEditable ||
      (tag === "input" && !["button", "checkbox", "radio", "range"].includes((target.type || "").toLowerCase()));
  };
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    let done = false;
    if (visible("rate-panel")) {
      if (/^[1-5]$/.test(event.key)) done = click(`star-${event.key}`);
      else if (event.key === "ArrowLeft") done = click("prev-sample");
      else if (event.key === "ArrowRight") done = click("next-sample");
    } else if (visible("compare-panel")) {
      const keys = { ArrowLeft: "cmp-left", ArrowRight: "cmp-right", ArrowUp: "cmp-both-good",
                     ArrowDown: "cmp-both-bad", s: "cmp-skip", S: "cmp-skip" };
      if (keys[event.key]) done = click(keys[event.key]);
    }
    if (done) event.preventDefault();
  });
})();
