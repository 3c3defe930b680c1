// The run page's live feed (htmx's SSE extension) says when it has lost the server: the state shown
// is then the last one received, not the run's. The extension retries by itself; once the stream is
// open again the note goes. A file, not an inline script (the Content-Security-Policy allows only
// this server's scripts); without JavaScript the page reloads itself instead.
(function () {
  function note(feed, lost) {
    const line = document.getElementById("run-connection");
    if (line) line.hidden = !lost;
    feed.classList.toggle("lost", lost);
  }
  document.addEventListener("htmx:sseError", (event) => {
    const feed = event.target.closest ? event.target.closest("#run-feed") : null;
    if (feed) note(feed, true);
  });
  document.addEventListener("htmx:sseOpen", (event) => {
    const feed = event.target.closest ? event.target.closest("#run-feed") : null;
    if (feed) note(feed, false);
  });
})();
