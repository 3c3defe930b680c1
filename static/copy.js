// "Copy" buttons beside the command line, the curl call and the Markdown summary. A file, not an
// inline script (the Content-Security-Policy allows only this server's own scripts). Without
// JavaScript the buttons stay hidden and the text is plain, selectable text.
document.documentElement.classList.add("js");

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  // http on another host is not a secure context: the older way, through a selection
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  const done = document.execCommand("copy");
  area.remove();
  return done ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

// one listener for the whole page: htmx swaps in new buttons after each change
document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  copyText(source.textContent).then(
    () => { button.textContent = "Copied"; },
    () => { button.textContent = "Select the text to copy"; },
  );
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
});
