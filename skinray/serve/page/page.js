// The upload page: one photo -> POST v1/explain -> the answer, its top classes and the overlay.
// Every server text is shown with textContent (never parsed as HTML). The API key stays in this
// tab's sessionStorage and goes in a header, never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "skinray-api-key";

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function errorText(response) {
  // The API answers errors as {"error": "..."}; a proxy in front may answer plain text.
  const text = await response.text();
  try {
    return JSON.parse(text).error || text;
  } catch {
    return text || response.statusText;
  }
}

function needKey(message) {
  $("key-panel").hidden = false;
  showError(message);
  $("key").focus();
}

async function loadModel() {
  const response = await fetch("v1/model", { headers: headers() });
  if (response.status === 401) {
    $("version").textContent = "(needs an API key)";
    needKey(sessionStorage.getItem(KEY) ? "The API key was refused." : "Enter the API key to use this endpoint.");
    return;
  }
  if (!response.ok) {
    $("version").textContent = "unavailable";
    showError(`The model is unavailable (${response.status}): ${await errorText(response)}`);
    return;
  }
  const model = await response.json();
  differentialCoverage = model.differential ? model.differential.coverage : null;
  $("version").textContent = `${model.version} · ${model.members.length} member(s) · ${model.classes.length} classes`;
  $("error").hidden = true;
}

let differentialCoverage = null;  // the served bundle's target, from /v1/model

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function showAnswer(answer) {
  $("label").textContent = answer.label;
  $("confidence").textContent = `${percent(answer.confidence)} confidence`;
  $("refer").hidden = !answer.abstained;
  $("refer").textContent = answer.out_of_distribution
    ? "Not answered: this photo is not like the images this model knows."
    : "Uncertain, refer: the ensemble is not confident enough to answer.";
  $("explained").textContent = answer.explained_label;
  const list = $("top-k");
  list.replaceChildren(...answer.top_k.map((item) => {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "top-label";
    name.textContent = `${item.label}: ${percent(item.probability)}`;
    const track = document.createElement("div");
    track.className = "bar-track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = percent(item.probability);
    track.append(bar);
    row.append(name, track);
    return row;
  }));
  const differential = answer.differential || [];
  $("differential-panel").hidden = differential.length === 0;
  $("differential").textContent = differential.join(", ");
  $("differential-coverage").textContent = differentialCoverage === null
    ? "the conditions that remain possible"
    : `the conditions that remain possible; holds the true one for ${Math.round(100 * differentialCoverage)}% of images`;
  $("overlay").src = `data:image/png;base64,${answer.explanation_png}`;
  $("result").hidden = false;
  $("status").textContent = `Answered in ${Math.round(answer.latency_ms)} ms by model ${answer.model_version}.`;
}

async function explain(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("status").textContent = `Scoring ${file.name}…`;
  const body = new FormData();
  body.append("file", file, file.name);
  let response;
  try {
    response = await fetch("v1/explain", { method: "POST", body, headers: headers() });
  } catch (error) {
    showError(`The server could not be reached: ${error.message}`);
    return;
  }
  if (response.status === 401) {
    needKey("The API key is missing or was refused.");
    return;
  }
  if (!response.ok) {
    showError(`${file.name}: ${await errorText(response)}`);
    return;
  }
  showAnswer(await response.json());
}

function init() {
  $("file").addEventListener("change", () => explain($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    explain(event.dataTransfer.files[0]);
  });
  $("save-key").addEventListener("click", () => {
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-panel").hidden = true;
    loadModel();
  });
  loadModel();
}

init();
