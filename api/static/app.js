// The vlsearch page: search by text, by a stored image or an uploaded one; the results as a grid of cards; a
// detail view that answers questions (the jobs panel is jobs.js). Everything goes through the public API (api.js) with
// the key the user enters. API data reaches the DOM as text only (textContent, never innerHTML).

import { api, ApiError, currentKey, isAbort, storeKey } from "./api.js";
import {
  altText,
  captionOf,
  el,
  errorText,
  fileName,
  formatScore,
  isoDate,
  relevance,
  score,
  sizeText,
  splitList,
  storedCaption,
  takenText,
  wholeNumber,
} from "./dom.js";
import { restartJobsPolling, showJobFields, updateJobCollectionHint } from "./jobs.js";

const DEFAULT_K = 20;
const MAX_K = 100;
const MODES = ["clip", "keyword", "hybrid"];
const SORTS = ["relevance", "date"];
const GRID_THUMB_SIZE = 256;
const DETAIL_THUMB_SIZE = 512;
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
  minRelevance: $("#min-relevance"),
  takenAfter: $("#taken-after"),
  takenBefore: $("#taken-before"),
  sort: $("#sort"),
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
  taken: $("#detail-taken"),
  tags: $("#detail-tags"),
  caption: $("#detail-caption"),
  prev: $("#detail-prev"),
  next: $("#detail-next"),
  close: $("#detail-close"),
  askForm: $("#ask-form"),
  question: $("#question"),
  answer: $("#answer"),
  conversation: $("#conversation"),
  newConversation: $("#new-conversation"),
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
  turns: [], // the conversation about this image the model still reads: { question, answer, item }, oldest first
};

// What location.search the page last showed: a fragment link (the skip link) fires popstate too, and must not
// run the same search again.
let appliedSearch = location.search;

/** k between 1 and MAX_K: an out-of-range value (a hand-edited URL) is brought into range. */
function pageSize(text) {
  const number = Number(String(text ?? "").trim());
  if (!String(text ?? "").trim() || !Number.isFinite(number)) return DEFAULT_K;
  return Math.min(MAX_K, Math.max(1, Math.round(number)));
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
    minRelevance: relevance(controls.minRelevance.value),
    takenAfter: isoDate(controls.takenAfter.value),
    takenBefore: isoDate(controls.takenBefore.value),
    sort: SORTS.includes(controls.sort.value) ? controls.sort.value : "relevance",
    k: pageSize(controls.k.value),
  };
}

function queryFromUrl() {
  const params = new URLSearchParams(location.search);
  const get = (name) => (params.get(name) ?? "").trim();
  const imageId = get("image_id");
  const mode = get("mode");
  const sort = get("sort");
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
    minRelevance: relevance(get("min_relevance")),
    takenAfter: isoDate(get("taken_after")),
    takenBefore: isoDate(get("taken_before")),
    sort: SORTS.includes(sort) ? sort : "relevance",
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
  controls.minRelevance.value = query.minRelevance ?? "";
  controls.takenAfter.value = query.takenAfter;
  controls.takenBefore.value = query.takenBefore;
  controls.sort.value = query.sort;
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
  // the API's bounds are inclusive instants (a date is its midnight): "on or before" a day includes all of it
  if (query.takenAfter) filter.taken_after = query.takenAfter;
  if (query.takenBefore) filter.taken_before = `${query.takenBefore}T23:59:59`;
  return Object.keys(filter).length ? filter : null;
}

function updateFilterCount() {
  const query = queryFromControls();
  const count =
    Object.keys(filterOf(query) ?? {}).length +
    (query.negative ? 1 : 0) +
    (query.minScore != null ? 1 : 0) +
    (query.minRelevance != null ? 1 : 0);
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
    if (query.minRelevance != null) options.min_relevance = query.minRelevance; // P("Yes") needs query text
  }
  if (query.captions) options.captions = true;
  if (query.sort !== "relevance") options.sort = query.sort;
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
    if (query.minRelevance != null) params.set("min_relevance", String(query.minRelevance));
  }
  if (query.captions) params.set("captions", "1");
  if (query.sort !== "relevance") params.set("sort", query.sort);
  if (query.takenAfter) params.set("taken_after", query.takenAfter);
  if (query.takenBefore) params.set("taken_before", query.takenBefore);
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
  if (query.minRelevance != null && !isImageQuery(query)) {
    text = `No images were relevant to "${query.text}" above ${query.minRelevance.toFixed(2)}.`;
  } else if (query.minScore != null) text = `No images scored above ${query.minScore.toFixed(2)}.`;
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
  if (hit.relevance != null) {
    scores.append(
      el("span", { className: "score-label" }, " · relevance "),
      el("span", { className: "relevance" }, formatScore(hit.relevance)),
    );
  }
  const card = el("li", { className: "result", dataset: { id: hit.id, index: String(index) } }, open, scores);
  const name = fileName(hit.path) || hit.payload?.source_name;
  if (name) card.append(el("p", { className: "file-name", title: hit.path ?? name }, name));
  const taken = takenText(hit.payload?.taken).slice(0, 10); // the date part: the detail view has the time
  if (taken) card.append(el("p", { className: "taken" }, el("time", { dateTime: hit.payload.taken }, taken)));
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
  resetConversation();
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
  detail.taken.textContent = takenText(payload.taken) || "Unknown";
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

const MAX_HISTORY = 50; // earlier turns the API takes with a question (api/schemas.py)

/** A new conversation about the image shown: no turns, no answer, nothing still coming counts. */
function resetConversation() {
  shown.askGeneration += 1;
  shown.turns = [];
  detail.conversation.replaceChildren();
  detail.conversation.hidden = true;
  detail.newConversation.hidden = true;
  detail.answer.textContent = "";
  detail.answer.removeAttribute("title");
  delete detail.answer.dataset.state;
}

/** Marks the oldest `count` turns as no longer read by the model, and forgets them. */
function dropOldestTurns(count) {
  for (const turn of shown.turns.slice(0, count)) {
    turn.item.dataset.dropped = "true";
    turn.item.title = "Left out: the model no longer reads this turn";
  }
  shown.turns = shown.turns.slice(count);
}

function addTurn(question, answer, model) {
  const item = el(
    "li",
    { className: "turn", title: `Answered by ${model}` },
    el("p", { className: "turn-question" }, question),
    el("p", { className: "turn-answer" }, answer || "(no answer)"),
  );
  detail.conversation.append(item);
  detail.conversation.hidden = false;
  detail.newConversation.hidden = false;
  shown.turns.push({ question, answer, item });
  detail.askForm.scrollIntoView({ block: "nearest" }); // the newest turn sits just above the question box
}

detail.newConversation.addEventListener("click", () => {
  resetConversation();
  detail.question.focus();
});

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
  dropOldestTurns(Math.max(0, shown.turns.length - MAX_HISTORY));
  const history = shown.turns.map((turn) => ({ question: turn.question, answer: turn.answer }));
  const body = { image_id: hit.id, question };
  if (history.length) body.history = history;
  if (search.collection) body.collection = search.collection;
  try {
    const answer = await api.ask(body, signal);
    if (generation !== shown.askGeneration) return;
    dropOldestTurns(answer.turns_dropped);
    addTurn(question, answer.answer, answer.model);
    if (detail.question.value.trim() === question) detail.question.value = "";
    const dropped = answer.turns_dropped;
    detail.answer.dataset.state = "done";
    detail.answer.textContent = dropped
      ? `${dropped} older turn${dropped === 1 ? " was" : "s were"} left out to fit the model's context.`
      : "";
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
  if (!open) return;
  open.focus();
  open.scrollIntoView({ block: "nearest" });
  // Closing a modal dialog also restores focus to what had it before showModal (the card first opened); whether
  // that comes before or after this event differs by how the dialog closed, so settle it once more next frame.
  requestAnimationFrame(() => {
    if (document.activeElement !== open) open.focus();
  });
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
