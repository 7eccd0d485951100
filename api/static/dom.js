// Small pieces the page's modules share: building elements, reading form fields, formatting, and an API error
// as the page shows it.

import { ApiError, currentKey } from "./api.js";

// --- small helpers ---------------------------------------------------------------------------------------------

/** An element with properties (dataset and aria-* as attributes) and children (strings become text nodes). */
export function el(tag, props = {}, ...children) {
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
export function fileName(path) {
  return path ? (path.split(/[\\/]/).filter(Boolean).pop() ?? path) : "";
}

/** Comma-separated words as a list, blanks dropped. */
export function splitList(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean);
}

/** A non-negative whole number, or null for blank or anything else. */
export function wholeNumber(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return null;
  const number = Number(trimmed);
  return Number.isInteger(number) && number >= 0 ? number : null;
}

/** A score bound (a CLIP cosine, -1 to 1), or null when empty or not a number. */
export function score(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return null;
  const number = Number(trimmed);
  return Number.isFinite(number) ? number : null;
}

/** A relevance bound, P("Yes") from 0 to 1, or null when empty or out of range. */
export function relevance(text) {
  const number = score(text);
  return number != null && number >= 0 && number <= 1 ? number : null;
}

/** A calendar date "YYYY-MM-DD" (a date input's value), or "" for blank or anything else. */
export function isoDate(text) {
  const trimmed = String(text ?? "").trim();
  return /^\d{4}-\d{2}-\d{2}$/.test(trimmed) && !Number.isNaN(Date.parse(trimmed)) ? trimmed : "";
}

/** "2021-06-01 12:34" from a payload's `taken` ("2021-06-01T12:34:56": the camera's time, or the file's in UTC). */
export function takenText(taken) {
  return typeof taken === "string" ? taken.slice(0, 16).replace("T", " ") : "";
}

export function formatScore(score) {
  return Number(score).toFixed(3);
}

export function formatBytes(bytes) {
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

export function formatDuration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/** "64 × 64 px, 3.1 kB, PNG" from whatever of it the payload has. */
export function sizeText(payload) {
  const parts = [];
  if (payload.width != null && payload.height != null) parts.push(`${payload.width} × ${payload.height} px`);
  if (payload.bytes != null) parts.push(formatBytes(payload.bytes));
  if (payload.format) parts.push(String(payload.format).toUpperCase());
  return parts.join(", ");
}

/** The first caption of a payload: captions are kept per generative model, {model identity: caption}. */
export function storedCaption(payload) {
  const captions = payload?.captions;
  const all = Array.isArray(captions) ? captions : Object.values(captions ?? {});
  return all.find((caption) => typeof caption === "string" && caption.trim()) ?? "";
}

/** This request's caption, else a stored one. */
export function captionOf(hit) {
  return hit.caption || storedCaption(hit.payload);
}

/** What a hit's picture says to someone who cannot see it: its caption, else its file name. */
export function altText(hit) {
  return captionOf(hit) || fileName(hit.path) || hit.payload?.source_name || `Image ${hit.id.slice(0, 12)}`;
}

export function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

/**
 * An error as the page shows it: the API's message word for word; for a 403 also, plainly, which scope the key
 * lacks for this action ("This key can't submit jobs: it needs the write scope.").
 */
export function errorText(error, action, scope) {
  if (!(error instanceof ApiError)) return String(error?.message ?? error);
  if (error.status === 403) return `${sentence(error.message)} This key can't ${action}: it needs the ${scope} scope.`;
  if (error.status === 401 && currentKey()) return `${sentence(error.message)} Check the API key above.`;
  return error.message;
}
