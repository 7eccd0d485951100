// The page's only way to the server: fetch with the stored key, and every failure as an ApiError that carries
// the API's own message (`{"error": {"code", "message"}}`), so the page can show it word for word.

const KEY_STORAGE = "vlsearch.apiKey";

// The key this page sends: what storeKey was last given, even where storage refused to keep it.
let sessionKey = storedKey();

/** The stored API key, or "" when there is none (or storage is blocked). */
export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return "";
  }
}

/** Keeps key for the next visit; an empty key forgets it. */
export function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage blocked (a private window's policy): the key still works for this page's requests below
  }
  sessionKey = key;
}

export function currentKey() {
  return sessionKey;
}

export class ApiError extends Error {
  /** status 0 means the server could not be reached. */
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export function isAbort(error) {
  return error?.name === "AbortError";
}

async function call(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  if (sessionKey) headers["X-API-Key"] = sessionKey;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary itself
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new ApiError(0, "network", `Could not reach the server (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  try {
    const { error } = await response.json();
    if (error?.message) return new ApiError(response.status, error.code ?? "", error.message);
  } catch {
    // not the API's JSON (a proxy's page, say): fall back to the status line
  }
  const line = `${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, "http", `The server answered ${line}.`);
}

async function requestJson(path, options) {
  return (await call(path, options)).json();
}

/** path with its query parameters, for the URLs the API hands out (thumbnail_url, image_url). */
function withParams(path, params) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, String(value));
  return url.pathname + url.search;
}

export const api = {
  collections: (signal) => requestJson("/v1/collections", { signal }),

  collection: (name, signal) => requestJson(`/v1/collections/${encodeURIComponent(name)}`, { signal }),

  search: (body, signal) => requestJson("/v1/search", { method: "POST", json: body, signal }),

  /** A search by an uploaded image: the file, and every other option as one JSON field. */
  searchByUpload(file, options, signal) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    form.append("options", JSON.stringify(options));
    return requestJson("/v1/search/image", { method: "POST", form, signal });
  },

  image: (imageUrl, signal) => requestJson(imageUrl, { signal }),

  /** The thumbnail as a Blob: an <img src> cannot send the key header, a blob: URL of this can be shown. */
  async thumbnail(thumbnailUrl, size, signal) {
    return (await call(withParams(thumbnailUrl, { size }), { signal })).blob();
  },

  ask: (body, signal) => requestJson("/v1/ask", { method: "POST", json: body, signal }),

  jobs: (signal) => requestJson("/v1/jobs", { signal }),

  submitJob: (body) => requestJson("/v1/jobs", { method: "POST", json: body }),

  cancelJob: (id) => requestJson(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }),
};
