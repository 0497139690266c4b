"""The browser's files, served by the daemon (``agor_actors.server._web``):
the board page (``index.html``, ``app.js``, ``style.css``) and the JavaScript
client (``agor-client.js``).  Package data: no Python here."""
