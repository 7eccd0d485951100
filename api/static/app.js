// The vlsearch page: search by text, by a stored image or an uploaded one; the results as a grid of cards; a
// detail view that answers questions; and the jobs panel. Everything goes through the public API (api.js) with
// the key the user enters. API data reaches the DOM as text only (textContent, never innerHTML).

import { api, ApiError, currentKey, isAbort, storeKey } from "./api.js";

const DEFAULT_K = 20;
const MAX_K = 100;
const MODES = ["clip", "keyword", "hybrid"];
const GRID_THUMB_SIZE = 256;
const DETAIL_THUMB_SIZE = 512;
const JOBS_FAST_POLL_MS = 1000; // while a job is unfinished and the page is visible
const JOBS_SLOW_POLL_MS = 5000;
const FINISHED_JOB_STATES = new Set(["done", "failed", "cancelled"]);
const COLLECTION_STORAGE = "vlsearch.collection"; // the collection last searched, preselected next visit

const $ = (selector) => document.querySelector(selector);

const controls = {
  apiKey: $("#api-key"),
  form: $("#search-form"),
  q: $("#q"),
  collection: $("#collection"),
  mode: $("#mode"),
  rerank: $("#rerank"),
  captions: $("#captions"),
  negative: $("#negative"),
  pathPrefix: $("#path-prefix"),
  tags: $("#tags"),
  minWidth: $("#min-width"),
  minScore: $("#min-score"),
  minHeight: $("#min-height"),
  k: $("#k"),
  imageFile: $("#image-file"),
  filters: $("#filters"),
  filterCount: $("#filter-count"),
};

const view = {
  status: $("#status"),
  results: $("#results"),
  loadMore: $("#load-more"),
  dropZone: $("#drop-zone"),
};

const detail = {
  dialog: $("#detail"),
  title: $("#detail-title"),
  image: $("#detail-image"),
  paths: $("#detail-paths"),
  size: $("#detail-size"),
  tags: $("#detail-tags"),
  caption: $("#detail-caption"),
  prev: $("#detail-prev"),
  next: $("#detail-next"),
  close: $("#detail-close"),
  askForm: $("#ask-form"),
  question: $("#question"),
  answer: $("#answer"),
};

const jobsView = {
  form: $("#job-form"),
  kind: $("#job-kind"),
  collection: $("#job-collection"),
  paths: $("#job-paths"),
  labels: $("#job-labels"),
  verify: $("#job-verify"),
  force: $("#job-force"),
  submit: $("#submit-job"),
  message: $("#job-message"),
  list: $("#job-list"),
};

// The one search on screen. A new search aborts the running request; `generation` tells a late answer of an
// older search (or page) from the current one, which alone may touch the page.
const search = {
  query: null, // the current query (see queryFromControls), also while its request runs or after it failed
  hits: [], // every hit shown, in the API's order (pages appended)
  offset: 0, // offset of the last page fetched
  collection: "", // the collection the API answered from
  controller: null,
  generation: 0,
};

// Grid thumbnails: fetched with the key header as blobs when their card nears the viewport; their blob: URLs
// are revoked, and their requests aborted, when the results are replaced.
const thumbnails = {
  controller: new AbortController(),
  urls: [],
  observer: new IntersectionObserver(onThumbnailsNearViewport, { rootMargin: "200px" }),
};
const hitOfThumbnail = new WeakMap();

// The detail view: which hit it shows, and what to abort or revoke when it moves on.
const shown = {
  index: -1,
  controller: null,
  imageUrl: null, // the detail view's own blob: URL (not a grid thumbnail's, which the grid revokes)
  askGeneration: 0,
};

// What location.search the page last showed: a fragment link (the skip link) fires popstate too, and must not
// run the same search again.
let appliedSearch = location.search;

// --- small helpers ---------------------------------------------------------------------------------------------

/** An element with properties (dataset and aria-* as attributes) and children (strings become text nodes). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

/** The last part of a path, for either separator. */
function fileName(path) {
  return path ? (path.split(/[\\/]/).filter(Boolean).pop() ?? path) : "";
}

/** Comma-separated words as a list, blanks dropped. */
function splitList(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean);
}

/** A non-negative whole number, or null for blank or anything else. */
function wholeNumber(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return null;
  const number = Number(trimmed);
  return Number.isInteger(number) && number >= 0 ? number : null;
}

/** A score bound (a CLIP cosine, -1 to 1), or null when empty or not a number. */
function score(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return null;
  const number = Number(trimmed);
  return Number.isFinite(number) ? number : null;
}

/** k between 1 and MAX_K: an out-of-range value (a hand-edited URL) is brought into range. */
function pageSize(text) {
  const number = Number(String(text ?? "").trim());
  if (!String(text ?? "").trim() || !Number.isFinite(number)) return DEFAULT_K;
  return Math.min(MAX_K, Math.max(1, Math.round(number)));
}

function formatScore(score) {
  return Number(score).toFixed(3);
}

function formatBytes(bytes) {
  if (bytes < 1000) return `${bytes} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function formatDuration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/** "64 × 64 px, 3.1 kB, PNG" from whatever of it the payload has. */
function sizeText(payload) {
  const parts = [];
  if (payload.width != null && payload.height != null) parts.push(`${payload.width} × ${payload.height} px`);
  if (payload.bytes != null) parts.push(formatBytes(payload.bytes));
  if (payload.format) parts.push(String(payload.format).toUpperCase());
  return parts.join(", ");
}

/** The first caption of a payload: captions are kept per generative model, {model identity: caption}. */
function storedCaption(payload) {
  const captions = payload?.captions;
  const all = Array.isArray(captions) ? captions : Object.values(captions ?? {});
  return all.find((caption) => typeof caption === "string" && caption.trim()) ?? "";
}

/** This request's caption, else a stored one. */
function captionOf(hit) {
  return hit.caption || storedCaption(hit.payload);
}

/** What a hit's picture says to someone who cannot see it: its caption, else its file name. */
function altText(hit) {
  return captionOf(hit) || fileName(hit.path) || hit.payload?.source_name || `Image ${hit.id.slice(0, 12)}`;
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

/**
 * An error as the page shows it: the API's message word for word; for a 403 also, plainly, which scope the key
 * lacks for this action ("This key can't submit jobs: it needs the write scope.").
 */
function errorText(error, action, scope) {
  if (!(error instanceof ApiError)) return String(error?.message ?? error);
  if (error.status === 403) return `${sentence(error.message)} This key can't ${action}: it needs the ${scope} scope.`;
  if (error.status === 401 && currentKey()) return `${sentence(error.message)} Check the API key above.`;
  return error.message;
}

function rememberedCollection() {
  try {
    return localStorage.getItem(COLLECTION_STORAGE) ?? "";
  } catch {
    return "";
  }
}

function rememberCollection(name) {
  try {
    localStorage.setItem(COLLECTION_STORAGE, name);
  } catch {
    // storage blocked: the page just preselects another collection next time
  }
}

// --- status line -----------------------------------------------------------------------------------------------

const IDLE_HINT =
  "Type what you are looking for and press Enter, or search by an image: pick one, drop it anywhere on the " +
  "page or paste it.";

function noKeyMessage(action = "search") {
  return [
    `Enter an API key above to ${action} (create one with `,
    el("code", {}, "vlsearch keys create --scopes read"),
    ").",
  ];
}

/** state is one of idle, nokey, busy, done, empty, error (the tests and the styles read data-state). */
function setStatus(state, ...content) {
  view.status.dataset.state = state;
  view.status.replaceChildren(...content);
}

function setBusy(busy) {
  if (busy) view.results.setAttribute("aria-busy", "true");
  else view.results.removeAttribute("aria-busy");
  view.loadMore.disabled = busy;
}

/** The status with no search on screen: what to do first, or what went wrong before any search. */
function showIdle(problem = "") {
  if (!currentKey()) setStatus("nokey", ...noKeyMessage());
  else if (problem) setStatus("error", problem);
  else setStatus("idle", IDLE_HINT);
}

// --- API key ---------------------------------------------------------------------------------------------------

// Stored on every keystroke, so that a search submitted right after typing already sends it; acted on (the
// current search again, the collections, the jobs) once the field changes.
controls.apiKey.addEventListener("input", () => storeKey(controls.apiKey.value.trim()));
controls.apiKey.addEventListener("change", onKeyChange);

async function onKeyChange() {
  storeKey(controls.apiKey.value.trim());
  restartJobsPolling();
  const collectionsLoaded = loadCollections();
  if (search.query) {
    runSearch(search.query);
    return;
  }
  const problem = await collectionsLoaded;
  if (!search.query) showIdle(problem); // unless a search started meanwhile, which says how it went itself
}

// --- collections -----------------------------------------------------------------------------------------------

/**
 * Fills #collection from the API. keep: a collection to keep selected even if not listed (the URL's: the search
 * then says plainly that there is no such collection). Answers an error text, or "" when it went well.
 */
async function loadCollections({ keep = "" } = {}) {
  if (!currentKey()) return "";
  let names, serverDefault;
  try {
    ({ collections: names, default: serverDefault } = await api.collections());
  } catch (error) {
    return errorText(error, "list collections", "read");
  }
  const listed = (name) => (name && names.includes(name) ? name : "");
  const chosen =
    keep ||
    listed(controls.collection.value) ||
    listed(rememberedCollection()) ||
    listed(serverDefault) ||
    names[0] ||
    "";
  setCollectionOptions(names, chosen);
  return "";
}

function setCollectionOptions(names, selected) {
  const all = selected && !names.includes(selected) ? [selected, ...names] : names;
  const options = all.map((name) => el("option", { value: name }, name));
  if (!options.length) options.push(el("option", { value: "" }, "(the server's default)"));
  controls.collection.replaceChildren(...options);
  controls.collection.value = selected || all[0] || "";
  updateJobCollectionHint();
}

/** Selects name, adding it as an option when the list lacks it (a URL's collection before the list is in). */
function selectCollection(name) {
  if (![...controls.collection.options].some((option) => option.value === name)) {
    controls.collection.prepend(el("option", { value: name }, name));
    controls.collection.querySelector('option[value=""]')?.remove();
  }
  controls.collection.value = name;
  updateJobCollectionHint();
}

controls.collection.addEventListener("change", () => {
  if (controls.collection.value) rememberCollection(controls.collection.value);
  updateJobCollectionHint();
});

// --- the query: controls, URL, request body --------------------------------------------------------------------

/** The query the controls describe (a text search; the image searches start from it and swap the text out). */
function queryFromControls() {
  return {
    text: controls.q.value.trim(),
    imageId: null, // a stored image to search by (bookmarkable)
    file: null, // an uploaded image to search by (not bookmarkable)
    collection: controls.collection.value,
    mode: controls.mode.value,
    rerank: controls.rerank.checked,
    captions: controls.captions.checked,
    negative: controls.negative.value.trim(),
    pathPrefix: controls.pathPrefix.value.trim(),
    tags: splitList(controls.tags.value),
    minWidth: wholeNumber(controls.minWidth.value),
    minHeight: wholeNumber(controls.minHeight.value),
    minScore: score(controls.minScore.value),
    k: pageSize(controls.k.value),
  };
}

function queryFromUrl() {
  const params = new URLSearchParams(location.search);
  const get = (name) => (params.get(name) ?? "").trim();
  const imageId = get("image_id");
  const mode = get("mode");
  return {
    text: imageId ? "" : get("q"),
    imageId: imageId || null,
    file: null,
    collection: get("collection"),
    mode: MODES.includes(mode) ? mode : "clip",
    rerank: params.get("rerank") === "1",
    captions: params.get("captions") === "1",
    negative: get("negative"),
    pathPrefix: get("path_prefix"),
    tags: splitList(get("tags")),
    minWidth: wholeNumber(get("min_width")),
    minHeight: wholeNumber(get("min_height")),
    minScore: score(get("min_score")),
    k: params.has("k") ? pageSize(get("k")) : DEFAULT_K,
  };
}

/** The controls showing query (a collection left out keeps the one selected). */
function fillControls(query) {
  controls.q.value = query.text;
  if (query.collection) selectCollection(query.collection);
  controls.mode.value = query.mode;
  controls.rerank.checked = query.rerank;
  controls.captions.checked = query.captions;
  controls.negative.value = query.negative;
  controls.pathPrefix.value = query.pathPrefix;
  controls.tags.value = query.tags.join(", ");
  controls.minWidth.value = query.minWidth ?? "";
  controls.minHeight.value = query.minHeight ?? "";
  controls.minScore.value = query.minScore ?? "";
  controls.k.value = String(query.k);
  // filters that narrow the results stay in sight, or the results would look wrong
  if (updateFilterCount()) controls.filters.open = true;
}

function isImageQuery(query) {
  return Boolean(query.imageId || query.file);
}

function isRunnable(query) {
  return Boolean(query.text) || isImageQuery(query);
}

function filterOf(query) {
  const filter = {};
  if (query.pathPrefix) filter.path_prefix = query.pathPrefix;
  if (query.tags.length) filter.tags_any = query.tags;
  if (query.minWidth != null) filter.min_width = query.minWidth;
  if (query.minHeight != null) filter.min_height = query.minHeight;
  return Object.keys(filter).length ? filter : null;
}

function updateFilterCount() {
  const query = queryFromControls();
  const count =
    Object.keys(filterOf(query) ?? {}).length + (query.negative ? 1 : 0) + (query.minScore != null ? 1 : 0);
  controls.filterCount.textContent = count ? `(${count} set)` : "";
  return count;
}

controls.filters.addEventListener("input", updateFilterCount);

/**
 * The request's options. Empty fields are left out (the API refuses unknown fields and checks types). A search
 * by an image sends the image with k, collection, filters and captions only: the API's text options (mode,
 * rerank, negative) need query text.
 */
function searchOptions(query, offset) {
  const options = { k: query.k };
  if (query.collection) options.collection = query.collection;
  if (offset) options.offset = offset;
  if (!isImageQuery(query)) {
    options.text = query.text;
    if (query.negative) options.negative = query.negative;
    if (query.mode !== "clip") options.mode = query.mode;
    if (query.rerank) options.rerank = true;
  }
  if (query.captions) options.captions = true;
  if (query.minScore != null) options.min_score = query.minScore;
  const filter = filterOf(query);
  if (filter) options.filter = filter;
  if (query.imageId) options.image_id = query.imageId;
  return options;
}

/** The URL's query string for query: "" for none; defaults (mode clip, k 20) left out. */
function urlOf(query) {
  const params = new URLSearchParams();
  if (query.imageId) params.set("image_id", query.imageId);
  else if (query.text) params.set("q", query.text);
  if (query.collection) params.set("collection", query.collection);
  if (!query.imageId) {
    if (query.mode !== "clip") params.set("mode", query.mode);
    if (query.rerank) params.set("rerank", "1");
    if (query.negative) params.set("negative", query.negative);
  }
  if (query.captions) params.set("captions", "1");
  if (query.pathPrefix) params.set("path_prefix", query.pathPrefix);
  if (query.tags.length) params.set("tags", query.tags.join(","));
  if (query.minWidth != null) params.set("min_width", String(query.minWidth));
  if (query.minHeight != null) params.set("min_height", String(query.minHeight));
  if (query.minScore != null) params.set("min_score", String(query.minScore));
  if (query.k !== DEFAULT_K) params.set("k", String(query.k));
  const text = params.toString();
  return text ? `?${text}` : "";
}

/** A new history entry for query, so that reload shows it again and Back returns to the one before. */
function pushQuery(query) {
  const url = urlOf(query);
  if (url !== location.search) history.pushState(null, "", url || location.pathname);
  appliedSearch = location.search;
}

/** Shows what the URL asks for: its controls, and its search when it has one. */
function applyUrl() {
  appliedSearch = location.search;
  const query = queryFromUrl();
  fillControls(query);
  query.collection ||= controls.collection.value;
  if (isRunnable(query)) {
    runSearch(query);
    return;
  }
  search.controller?.abort();
  search.generation += 1;
  search.query = null;
  clearResults();
  setBusy(false);
  showIdle();
}

window.addEventListener("popstate", () => {
  if (location.search !== appliedSearch) applyUrl();
});

controls.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = queryFromControls();
  if (!query.text && search.query && isImageQuery(search.query)) {
    // no text, an image search on screen: the same image again, with the options as they are now
    query.imageId = search.query.imageId;
    query.file = search.query.file;
  }
  if (!isRunnable(query)) {
    controls.q.focus();
    if (!search.hits.length) showIdle();
    return;
  }
  if (!query.file) pushQuery(query);
  runSearch(query);
});

// --- running a search ------------------------------------------------------------------------------------------

/** Runs query (append: its next page, added to the cards). The page shows only the latest search's answer. */
async function runSearch(query, { append = false } = {}) {
  search.controller?.abort();
  const generation = ++search.generation;
  if (!append) search.query = query;
  if (!currentKey()) {
    clearResults();
    setBusy(false);
    setStatus("nokey", ...noKeyMessage());
    return;
  }
  const controller = new AbortController();
  search.controller = controller;
  const offset = append ? search.offset + query.k : 0;
  const options = searchOptions(query, offset);
  setStatus("busy", options.rerank ? "Reranking with the generative model…" : "Searching…");
  setBusy(true);
  if (query.collection) rememberCollection(query.collection);
  try {
    const answer = query.file
      ? await api.searchByUpload(query.file, options, controller.signal)
      : await api.search(options, controller.signal);
    if (generation !== search.generation) return;
    if (!append) clearResults();
    search.offset = offset;
    search.collection = answer.collection;
    if (!query.collection && answer.collection) nameCollection(query, answer.collection);
    appendHits(answer.hits);
    view.loadMore.hidden = answer.hits.length < query.k; // a short page was the last one
    showSummary(query, answer);
  } catch (error) {
    if (generation !== search.generation || isAbort(error)) return;
    if (!append) clearResults(); // old results under a failed new query would read as its answer
    setStatus("error", errorText(error, "search", "read"));
  } finally {
    if (generation === search.generation) {
      search.controller = null;
      setBusy(false);
    }
  }
}

/**
 * A query sent without a collection (typed before the list came) was answered from the server's default: from
 * now on it names that collection, in the select and in the URL, so that reload and Back ask for the same.
 */
function nameCollection(query, collection) {
  const unnamed = urlOf(query); // the URL, if this query is what put it there
  query.collection = collection;
  selectCollection(collection);
  if (!query.file && location.search === unnamed) {
    history.replaceState(null, "", urlOf(query));
    appliedSearch = location.search;
  }
}

function showSummary(query, answer) {
  const count = search.hits.length;
  if (!count) {
    setStatus("empty", emptyText(query));
    return;
  }
  const noun = count === 1 ? "result" : "results";
  setStatus("done", `${count} ${noun} in ${Math.round(answer.took_ms)} ms`);
}

function emptyText(query) {
  let text;
  if (query.minScore != null) text = `No images scored above ${query.minScore.toFixed(2)}.`;
  else if (query.file) text = "No images matched the uploaded image.";
  else if (query.imageId) text = "No images matched this image.";
  else text = `No images matched "${query.text}".`;
  return filterOf(query) ? `${text} Try fewer filters.` : text;
}

view.loadMore.addEventListener("click", () => {
  if (search.query) runSearch(search.query, { append: true });
});

// --- result cards ----------------------------------------------------------------------------------------------

/** Removes every card, with the thumbnails' requests and blob: URLs, and the detail view showing one of them. */
function clearResults() {
  thumbnails.controller.abort();
  thumbnails.controller = new AbortController();
  thumbnails.observer.disconnect();
  for (const url of thumbnails.urls) URL.revokeObjectURL(url);
  thumbnails.urls = [];
  shown.index = -1; // the dialog's close must not focus a card of the results that come next
  if (detail.dialog.open) detail.dialog.close();
  search.hits = [];
  search.offset = 0;
  view.results.replaceChildren();
  view.loadMore.hidden = true;
}

function appendHits(hits) {
  const start = search.hits.length;
  search.hits.push(...hits);
  const cards = hits.map((hit, position) => resultCard(hit, start + position));
  view.results.append(...cards);
  for (const card of cards) thumbnails.observer.observe(card.querySelector(".thumb"));
}

function resultCard(hit, index) {
  const alt = altText(hit);
  const thumb = el("img", { className: "thumb", alt, decoding: "async" });
  hitOfThumbnail.set(thumb, hit);
  // named by the picture's alt text: the image inside is the button's only content
  const open = el(
    "button",
    { type: "button", className: "open", "aria-label": alt, "aria-haspopup": "dialog" },
    thumb,
  );
  const scores = el(
    "p",
    { className: "scores" },
    el("span", { className: "score-label" }, "score "),
    el("span", { className: "score" }, formatScore(hit.score)),
  );
  if (hit.rerank_score != null) {
    scores.append(
      el("span", { className: "score-label" }, " · rerank "),
      el("span", { className: "rerank-score" }, formatScore(hit.rerank_score)),
    );
  }
  const card = el("li", { className: "result", dataset: { id: hit.id, index: String(index) } }, open, scores);
  const name = fileName(hit.path) || hit.payload?.source_name;
  if (name) card.append(el("p", { className: "file-name", title: hit.path ?? name }, name));
  const caption = captionOf(hit);
  if (caption) card.append(el("p", { className: "caption" }, caption));
  card.append(el("button", { type: "button", className: "more-like-this" }, "More like this"));
  return card;
}

view.results.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  const card = button?.closest(".result");
  if (!card) return;
  const index = Number(card.dataset.index);
  if (button.classList.contains("open")) openDetail(index);
  else if (button.classList.contains("more-like-this")) searchLike(search.hits[index]);
});

function onThumbnailsNearViewport(entries) {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    thumbnails.observer.unobserve(entry.target);
    loadThumbnail(entry.target);
  }
}

/**
 * Fetches a card's thumbnail and swaps the placeholder <img> for a copy that has decoded it: the card shows the
 * whole picture at once, and an <img class="thumb"> with a src is always a loaded one.
 */
async function loadThumbnail(placeholder) {
  const hit = hitOfThumbnail.get(placeholder);
  const { signal } = thumbnails.controller;
  try {
    const blob = await api.thumbnail(hit.thumbnail_url, GRID_THUMB_SIZE, signal);
    if (signal.aborted) return;
    const url = URL.createObjectURL(blob);
    thumbnails.urls.push(url);
    const loaded = placeholder.cloneNode();
    loaded.src = url;
    await loaded.decode();
    if (signal.aborted || !placeholder.isConnected) return;
    placeholder.replaceWith(loaded);
  } catch (error) {
    if (signal.aborted || isAbort(error)) return;
    placeholder.closest(".result")?.classList.add("thumb-failed");
    placeholder.title = error instanceof ApiError ? error.message : "The thumbnail could not be shown.";
  }
}

// --- search by image -------------------------------------------------------------------------------------------

/** A search by an uploaded image with the current collection, k and filters. The URL stays: an upload can't be
 *  bookmarked. */
function searchByUpload(file) {
  if (file.type && !file.type.startsWith("image/")) {
    setStatus("error", `"${file.name}" is not an image: pick a JPEG, PNG, WebP or other image file.`);
    return;
  }
  controls.q.value = "";
  runSearch({ ...queryFromControls(), text: "", file });
}

/** "More like this": a search by the stored image, bookmarkable (?image_id=…&collection=…). */
function searchLike(hit) {
  controls.q.value = "";
  const collection = search.collection || controls.collection.value;
  const query = { ...queryFromControls(), text: "", imageId: hit.id, collection };
  pushQuery(query);
  view.status.scrollIntoView({ block: "nearest" });
  runSearch(query);
}

/** The first image of a file list (a type the browser does not know is left to the server to judge). */
function firstImage(files) {
  return Array.from(files ?? []).find((file) => !file.type || file.type.startsWith("image/")) ?? null;
}

controls.imageFile.addEventListener("change", () => {
  const [file] = controls.imageFile.files;
  controls.imageFile.value = ""; // picking the same file again is a new search
  if (file) searchByUpload(file);
});

// Dragging files over the page shows the drop hint; dragenter and dragleave come in pairs for every element
// crossed, so a count tells when the drag has left the page.
let dragDepth = 0;

function carriesFiles(event) {
  return Array.from(event.dataTransfer?.types ?? []).includes("Files");
}

function hideDropZone() {
  dragDepth = 0;
  view.dropZone.classList.remove("active");
}

document.addEventListener("dragenter", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth += 1;
  view.dropZone.classList.add("active");
});

document.addEventListener("dragleave", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) hideDropZone();
});

document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault(); // without it the browser would open the file instead of dropping it here
  event.dataTransfer.dropEffect = "copy";
  view.dropZone.classList.add("active");
});

document.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  hideDropZone();
  const file = firstImage(event.dataTransfer.files);
  if (file) searchByUpload(file);
  else setStatus("error", "Drop an image file (JPEG, PNG, WebP, …) to search by it.");
});

document.addEventListener("dragend", hideDropZone);

document.addEventListener("paste", (event) => {
  const data = event.clipboardData;
  const files = data?.files?.length
    ? data.files
    : Array.from(data?.items ?? [])
        .filter((item) => item.kind === "file")
        .map((item) => item.getAsFile());
  const file = firstImage(files);
  if (!file) return; // text pastes into the fields as usual
  event.preventDefault();
  searchByUpload(file);
});

// --- the detail view -------------------------------------------------------------------------------------------

function openDetail(index) {
  showDetail(index);
  if (!detail.dialog.open) detail.dialog.showModal();
}

/** Fills the dialog with hit number index (does nothing past either end). */
function showDetail(index) {
  const hit = search.hits[index];
  if (!hit) return;
  shown.controller?.abort();
  shown.controller = new AbortController();
  shown.index = index;
  shown.askGeneration += 1; // an answer still coming is about the image before
  detail.dialog.dataset.id = hit.id;
  const alt = altText(hit);
  detail.title.textContent = fileName(hit.path) || alt;
  detail.image.alt = alt;
  fillDetailInfo(hit.paths, hit.payload, captionOf(hit));
  detail.answer.textContent = "";
  delete detail.answer.dataset.state;
  setNavigable(detail.prev, index > 0);
  setNavigable(detail.next, index < search.hits.length - 1);
  loadDetailImage(hit, index, shown.controller.signal);
  refreshDetailInfo(hit, shown.controller.signal);
}

/** Enables or disables a previous/next button; focus on a button being disabled moves to Close, not nowhere. */
function setNavigable(button, enabled) {
  if (!enabled && document.activeElement === button) detail.close.focus();
  button.disabled = !enabled;
}

function fillDetailInfo(paths, payload, caption) {
  const names = paths.length ? paths : [payload.source_name ?? "No path: indexed from an upload or a URL"];
  detail.paths.replaceChildren(...names.map((path) => el("li", {}, path)));
  detail.size.textContent = sizeText(payload) || "Unknown";
  const tags = payload.tags ?? [];
  detail.tags.textContent = tags.length ? tags.join(", ") : "No tags";
  detail.caption.textContent = caption || "No caption";
}

/** The 512 px thumbnail, with the card's 256 px one shown meanwhile when it has loaded. */
async function loadDetailImage(hit, index, signal) {
  releaseDetailImage();
  const cardThumb = view.results.children[index]?.querySelector(".thumb");
  if (cardThumb?.src) detail.image.src = cardThumb.src;
  try {
    const blob = await api.thumbnail(hit.thumbnail_url, DETAIL_THUMB_SIZE, signal);
    if (signal.aborted) return;
    shown.imageUrl = URL.createObjectURL(blob);
    detail.image.src = shown.imageUrl;
  } catch (error) {
    if (signal.aborted || isAbort(error)) return;
    detail.image.title = errorText(error, "see images", "read");
  }
}

function releaseDetailImage() {
  detail.image.removeAttribute("src");
  detail.image.removeAttribute("title");
  if (shown.imageUrl) URL.revokeObjectURL(shown.imageUrl);
  shown.imageUrl = null;
}

/** The stored record again: tags or captions added since the search (a tag job, say) show up too. */
async function refreshDetailInfo(hit, signal) {
  try {
    const image = await api.image(hit.image_url, signal);
    if (signal.aborted) return;
    fillDetailInfo(image.paths, image.payload, hit.caption || storedCaption(image.payload));
  } catch {
    // the search's copy of the same record is already shown
  }
}

detail.askForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const hit = search.hits[shown.index];
  const question = detail.question.value.trim();
  if (!hit || !question) return;
  if (!currentKey()) {
    detail.answer.replaceChildren(...noKeyMessage("ask about images"));
    return;
  }
  const generation = ++shown.askGeneration;
  const { signal } = shown.controller;
  detail.answer.dataset.state = "busy";
  detail.answer.textContent = "Asking…";
  const body = { image_id: hit.id, question };
  if (search.collection) body.collection = search.collection;
  try {
    const answer = await api.ask(body, signal);
    if (generation !== shown.askGeneration) return;
    detail.answer.dataset.state = "done";
    detail.answer.textContent = answer.answer;
    detail.answer.title = `Answered by ${answer.model}`;
  } catch (error) {
    if (generation !== shown.askGeneration || isAbort(error)) return;
    detail.answer.dataset.state = "error";
    detail.answer.textContent = errorText(error, "ask about images", "read");
  }
});

/** Where the arrow keys edit text rather than move between results. */
function isTextEntry(target) {
  return target instanceof HTMLElement && (target.isContentEditable || target.matches("input, textarea, select"));
}

// On the document, not the dialog: focus can land on the page's body (a click on the picture), where the
// dialog's own listener would not hear the keys.
document.addEventListener("keydown", (event) => {
  if (!detail.dialog.open || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (!step || isTextEntry(event.target)) return;
  event.preventDefault();
  showDetail(shown.index + step);
});

detail.prev.addEventListener("click", () => showDetail(shown.index - 1));
detail.next.addEventListener("click", () => showDetail(shown.index + 1));
detail.close.addEventListener("click", () => detail.dialog.close());

// A click on the dialog element itself is one on its backdrop: its content fills it edge to edge.
detail.dialog.addEventListener("click", (event) => {
  if (event.target === detail.dialog) detail.dialog.close();
});

// Esc (native), Close or the backdrop: stop what the view still fetches, and give focus back to the card last
// shown, which may not be the one opened.
detail.dialog.addEventListener("close", () => {
  shown.controller?.abort();
  shown.askGeneration += 1;
  releaseDetailImage();
  const open = view.results.children[shown.index]?.querySelector(".open");
  if (open) {
    open.focus();
    open.scrollIntoView({ block: "nearest" });
  }
});

// --- jobs ------------------------------------------------------------------------------------------------------

// Polled while there is a key: every second while a job is unfinished and the page is visible, else every five
// seconds. A 401, 403 or 503 (jobs not configured) ends the polling: asking again would only repeat the answer.
const jobs = {
  polling: false,
  generation: 0, // bumped when the key changes: an answer for the old key is dropped
  timer: 0,
  inFlight: false,
  again: false, // a poll was asked for while one ran
  pollFailed: false,
  items: new Map(), // job id -> its row's elements, updated in place (focus and open <details> survive a poll)
};

function setJobMessage(text) {
  jobsView.message.textContent = text;
}

function restartJobsPolling() {
  if (!currentKey()) {
    stopJobsPolling();
    renderJobs([]);
    setJobMessage("Enter an API key above to see and submit jobs.");
    return;
  }
  setJobMessage("");
  resumeJobsPolling();
}

function stopJobsPolling() {
  clearTimeout(jobs.timer);
  jobs.generation += 1;
  jobs.polling = false;
  jobs.inFlight = false;
}

function resumeJobsPolling() {
  stopJobsPolling();
  jobs.polling = true;
  pollJobs();
}

/** A poll now (after a submit or cancel, or when the page shows again), or right after the one running. */
function pollJobsSoon() {
  if (!jobs.polling) return;
  if (jobs.inFlight) {
    jobs.again = true;
    return;
  }
  clearTimeout(jobs.timer);
  pollJobs();
}

async function pollJobs() {
  const generation = jobs.generation;
  jobs.inFlight = true;
  jobs.again = false;
  let delay = JOBS_SLOW_POLL_MS;
  try {
    const { jobs: list } = await api.jobs();
    if (generation !== jobs.generation) return;
    renderJobs(list);
    if (jobs.pollFailed) setJobMessage(""); // the earlier failure has passed
    jobs.pollFailed = false;
    const unfinished = list.some((job) => !FINISHED_JOB_STATES.has(job.state));
    if (unfinished && document.visibilityState === "visible") delay = JOBS_FAST_POLL_MS;
  } catch (error) {
    if (generation !== jobs.generation) return;
    setJobMessage(errorText(error, "see jobs", "read"));
    if ([401, 403, 503].includes(error.status)) {
      jobs.polling = false;
      return;
    }
    jobs.pollFailed = true; // a network error or 429: try again later
  } finally {
    if (generation === jobs.generation) jobs.inFlight = false;
  }
  jobs.timer = setTimeout(pollJobs, jobs.again ? 0 : delay);
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") pollJobsSoon();
});

/** The rows for list (newest first): kept rows updated, new ones added, gone ones removed. */
function renderJobs(list) {
  const ids = new Set(list.map((job) => job.id));
  for (const [id, item] of jobs.items) {
    if (!ids.has(id)) {
      item.li.remove();
      jobs.items.delete(id);
    }
  }
  list.forEach((job, position) => {
    const item = jobItem(job);
    const here = jobsView.list.children[position];
    if (here !== item.li) jobsView.list.insertBefore(item.li, here ?? null);
  });
}

/** One job shown at the top of the list at once (a submit's answer), before the next poll places it. */
function showJob(job) {
  const known = jobs.items.has(job.id);
  const item = jobItem(job);
  if (!known) jobsView.list.prepend(item.li);
}

/** The row of job, made on first sight and brought up to date. */
function jobItem(job) {
  let item = jobs.items.get(job.id);
  if (!item) {
    item = newJobItem(job.id);
    jobs.items.set(job.id, item);
  }
  updateJobItem(item, job);
  return item;
}

function newJobItem(id) {
  const item = {
    kind: el("span", { className: "job-kind" }),
    collection: el("span", { className: "job-collection" }),
    state: el("span", { className: "job-state" }),
    progress: el("progress", { className: "job-progress" }),
    counts: el("p", { className: "job-counts" }),
    rate: el("p", { className: "job-rate" }),
    reason: el("p", { className: "job-reason" }),
    actions: el("div", { className: "job-actions" }),
    cancel: el("button", { type: "button", className: "job-cancel" }, "Cancel"),
    errors: el("details", { className: "job-errors" }),
    errorsSummary: el("summary"),
    errorList: el("ul"),
    errorCount: -1,
  };
  item.errors.append(item.errorsSummary, item.errorList);
  const head = el("p", { className: "job-head" }, item.kind, " · ", item.collection, " ", item.state);
  item.li = el(
    "li",
    { className: "job", dataset: { jobId: id } },
    head,
    item.progress,
    item.counts,
    item.rate,
    item.reason,
    item.actions,
    item.errors,
  );
  return item;
}

function updateJobItem(item, job) {
  const finished = FINISHED_JOB_STATES.has(job.state);
  const processed = job.done + job.failed;
  item.li.dataset.state = job.state;
  item.li.title = `Job ${job.id}, submitted ${new Date(job.created * 1000).toLocaleString()}`;
  item.kind.textContent = job.kind;
  item.collection.textContent = job.collection;
  item.state.textContent = job.state;

  item.progress.setAttribute("aria-label", `Progress of the ${job.kind} job on ${job.collection}`);
  if (job.total > 0) {
    item.progress.max = job.total;
    item.progress.value = Math.min(processed, job.total);
  } else if (finished) {
    item.progress.max = 1; // nothing to do, and done with it: full
    item.progress.value = 1;
  } else {
    item.progress.removeAttribute("value"); // indeterminate: the total is not counted yet
  }
  item.counts.textContent = `${job.done}/${job.total}, ${job.failed} failed`;

  const rate = job.state === "running" && job.rate > 0 ? rateText(job) : "";
  item.rate.textContent = rate;
  item.rate.hidden = !rate;
  item.reason.textContent = job.reason ?? "";
  item.reason.hidden = !job.reason;

  // Absent, not hidden, once finished: a finished job has nothing to cancel.
  if (finished) item.cancel.remove();
  else if (!item.cancel.isConnected) item.actions.append(item.cancel);

  const errors = job.errors ?? [];
  item.errors.hidden = !errors.length;
  if (errors.length !== item.errorCount) {
    item.errorCount = errors.length;
    item.errorsSummary.textContent = errors.length === 1 ? "1 error" : `${errors.length} errors`;
    const rows = errors.map((error) =>
      el("li", {}, el("span", { className: "job-error-source" }, error.source), `: ${error.reason}`),
    );
    item.errorList.replaceChildren(...rows);
  }
}

function rateText(job) {
  const remaining = Math.max(0, job.total - job.done - job.failed);
  const eta = remaining > 0 ? `, about ${formatDuration(remaining / job.rate)} left` : "";
  return `${job.rate.toFixed(job.rate < 10 ? 1 : 0)} items/s${eta}`;
}

jobsView.list.addEventListener("click", async (event) => {
  const button = event.target.closest(".job-cancel");
  if (!button) return;
  const id = button.closest(".job").dataset.jobId;
  button.disabled = true;
  try {
    const job = await api.cancelJob(id);
    showJob(job);
  } catch (error) {
    setJobMessage(errorText(error, "cancel jobs", "write"));
  } finally {
    button.disabled = false; // the row drops the button once the job has ended
  }
  pollJobsSoon();
});

/** Only the fields of the chosen kind are shown: the others do not apply to it. */
function showJobFields() {
  for (const field of jobsView.form.querySelectorAll("[data-for-kind]")) {
    field.hidden = field.dataset.forKind !== jobsView.kind.value;
  }
}

jobsView.kind.addEventListener("change", showJobFields);

function updateJobCollectionHint() {
  jobsView.collection.placeholder = controls.collection.value || "the server's default";
}

/** The job request the form describes, or a problem to fix first. */
function jobRequest() {
  const kind = jobsView.kind.value;
  const body = { kind };
  const collection = jobsView.collection.value.trim() || controls.collection.value;
  if (collection) body.collection = collection;
  if (kind === "index") {
    const paths = jobsView.paths.value
      .split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    if (!paths.length) return { problem: "List at least one folder or file on the server, one per line." };
    body.paths = paths;
  } else if (kind === "tag") {
    const labels = splitList(jobsView.labels.value);
    if (labels.length) body.labels = labels;
    if (jobsView.verify.checked) body.verify = true;
  } else if (kind === "caption" && jobsView.force.checked) {
    body.force = true;
  }
  return { body };
}

jobsView.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!currentKey()) {
    setJobMessage("Enter an API key above to submit jobs.");
    return;
  }
  const { body, problem } = jobRequest();
  if (problem) {
    setJobMessage(problem);
    return;
  }
  jobsView.submit.disabled = true;
  setJobMessage("Submitting…");
  try {
    const job = await api.submitJob(body);
    setJobMessage(`Submitted the ${job.kind} job on "${job.collection}".`);
    showJob(job);
    if (jobs.polling) pollJobsSoon();
    else resumeJobsPolling();
  } catch (error) {
    setJobMessage(errorText(error, "submit jobs", "write"));
  } finally {
    jobsView.submit.disabled = false;
  }
});

// --- start -----------------------------------------------------------------------------------------------------

async function start() {
  controls.apiKey.value = currentKey();
  showJobFields();
  const query = queryFromUrl();
  fillControls(query);
  if (!isRunnable(query)) showIdle();
  restartJobsPolling();
  const problem = await loadCollections({ keep: query.collection });
  if (search.generation) return; // a search started meanwhile (typed, or Back): it is the current one
  query.collection ||= controls.collection.value;
  if (isRunnable(query)) runSearch(query);
  else showIdle(problem);
}

start();
