// The jobs panel (a write key): submit index, tag and caption jobs, and a live list of every job with its
// progress, rate, errors and a cancel button. The collection of a job defaults to the one selected for search.

import { api, currentKey } from "./api.js";
import { el, errorText, formatDuration, splitList } from "./dom.js";

const JOBS_FAST_POLL_MS = 1000; // while a job is unfinished and the page is visible
const JOBS_SLOW_POLL_MS = 5000;
const FINISHED_JOB_STATES = new Set(["done", "failed", "cancelled"]);

const searchCollection = document.querySelector("#collection");
const jobsView = {
  form: document.querySelector("#job-form"),
  kind: document.querySelector("#job-kind"),
  collection: document.querySelector("#job-collection"),
  paths: document.querySelector("#job-paths"),
  labels: document.querySelector("#job-labels"),
  verify: document.querySelector("#job-verify"),
  force: document.querySelector("#job-force"),
  submit: document.querySelector("#submit-job"),
  message: document.querySelector("#job-message"),
  list: document.querySelector("#job-list"),
};

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

export function restartJobsPolling() {
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
export function showJobFields() {
  for (const field of jobsView.form.querySelectorAll("[data-for-kind]")) {
    field.hidden = field.dataset.forKind !== jobsView.kind.value;
  }
}

jobsView.kind.addEventListener("change", showJobFields);

export function updateJobCollectionHint() {
  jobsView.collection.placeholder = searchCollection.value || "the server's default";
}

/** The job request the form describes, or a problem to fix first. */
function jobRequest() {
  const kind = jobsView.kind.value;
  const body = { kind };
  const collection = jobsView.collection.value.trim() || searchCollection.value;
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
