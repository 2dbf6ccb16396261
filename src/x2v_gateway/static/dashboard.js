// x2v-gateway dashboard: what htmx attributes cannot say on their own.
// Uploads with progress, the live-connection badge, local times, messages. No build step.
(function () {
  "use strict";

  const csrfToken = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

  // -- every htmx request: the CSRF token (once sign-in exists), errors shown in #flash ------

  document.addEventListener("htmx:configRequest", (event) => {
    const token = csrfToken();
    if (token) event.detail.headers["X-CSRFToken"] = token;
  });

  function flash(html) {
    const box = document.getElementById("flash");
    if (box) box.innerHTML = html;
  }

  function flashText(text) {
    const p = document.createElement("p");
    p.className = "flash-message error-text";
    p.textContent = text + " ";
    const close = document.createElement("button");
    close.type = "button";
    close.className = "link dismiss";
    close.setAttribute("aria-label", "Dismiss this message");
    close.textContent = "×";
    p.appendChild(close);
    flash(p.outerHTML);
  }

  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    // The dashboard answers its own errors with a short message fragment that says what to fix.
    if (xhr.responseText.includes('class="flash-message')) flash(xhr.responseText);
    else flashText(`The gateway answered ${xhr.status} ${xhr.statusText}. Try again.`);
  });

  document.addEventListener("htmx:sendError", () => {
    flashText("The gateway did not answer: check that it is running, then try again.");
  });

  document.addEventListener("click", (event) => {
    if (event.target.closest(".dismiss")) flash("");
  });

  // -- live updates: a badge for the stream, and a resync after every reconnection ----------

  document.addEventListener("htmx:sseOpen", (event) => {
    const source = event.target;
    setLive(true);
    // Events sent while the stream was down are gone: fetch what the page shows again.
    if (source.dataset.sseOpened) htmx.trigger(document.body, "resync");
    source.dataset.sseOpened = "1";
  });

  document.addEventListener("htmx:sseError", () => setLive(false));

  function setLive(ok) {
    const badge = document.getElementById("live");
    if (!badge) return;
    badge.hidden = false;
    badge.className = ok ? "live ok" : "live down";
    badge.textContent = ok ? "Live" : "Reconnecting…";
  }

  // -- times in the reader's own time zone --------------------------------------------------

  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const when = new Date(el.dateTime);
      if (isNaN(when)) return;
      el.title = el.dateTime;
      // Always with its date: "10:42" on a page left open overnight says the wrong day.
      el.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
    });
  }

  // -- posters: hovered, focused or clicked, the video plays over its poster, muted ----------

  function preview(poster, on) {
    const playing = poster.querySelector("video");
    if (on && !playing) {
      const video = document.createElement("video");
      Object.assign(video, { src: poster.dataset.video, muted: true, loop: true, playsInline: true, autoplay: true });
      video.setAttribute("aria-hidden", "true");
      poster.appendChild(video);
      poster.classList.add("playing");
      video.play().catch(() => {}); // a browser that refuses autoplay still shows the poster
    } else if (!on && playing) {
      playing.remove();
      poster.classList.remove("playing", "pinned");
    }
  }

  const posterOf = (target) => (target instanceof Element ? target.closest(".poster[data-video]") : null);

  // "stopped": stopped by a click while the pointer is on it; it plays on hover again only
  // once the pointer has left (removing the video under the pointer is itself a "mouseover").
  document.addEventListener("mouseover", (event) => {
    const poster = posterOf(event.target);
    if (poster && !poster.classList.contains("stopped")) preview(poster, true);
  });
  document.addEventListener("mouseout", (event) => {
    const poster = posterOf(event.target);
    if (!poster || poster.contains(event.relatedTarget)) return;
    poster.classList.remove("stopped");
    if (!poster.classList.contains("pinned")) preview(poster, false);
  });
  document.addEventListener("focusin", (event) => {
    const poster = posterOf(event.target);
    if (poster) preview(poster, true);
  });
  document.addEventListener("focusout", (event) => {
    const poster = posterOf(event.target);
    if (poster && !poster.classList.contains("pinned")) preview(poster, false);
  });
  // A click (or a tap, where there is no hover) keeps it playing; a second one stops it.
  document.addEventListener("click", (event) => {
    const poster = posterOf(event.target);
    if (!poster) return;
    if (poster.classList.contains("pinned")) {
      preview(poster, false);
      poster.classList.add("stopped");
    } else {
      preview(poster, true);
      poster.classList.add("pinned");
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    htmx.onLoad(localizeTimes);
    const form = document.getElementById("batch-form");
    if (form) setUpBatchForm(form);
  });

  // -- the new-batch form ------------------------------------------------------------------

  const AUDIO_NAME = /\.(wav|mp3|m4a|aac|flac|ogg|oga|opus|wma|aif|aiff|caf)$/i;
  const VIDEO_NAME = /\.(mp4|m4v|mov|webm|mkv|avi)$/i;
  const PARALLEL_UPLOADS = 3;

  function guessRole(file) {
    if (file.type.startsWith("audio/")) return "audio";
    if (file.type.startsWith("image/")) return "image";
    if (file.type.startsWith("video/")) return "video";  // animate's driving video
    if (AUDIO_NAME.test(file.name)) return "audio";
    return VIDEO_NAME.test(file.name) ? "video" : "image";
  }

  function setUpBatchForm(form) {
    const list = document.getElementById("uploads");
    const template = document.getElementById("upload-pending");
    const picker = document.getElementById("files");
    const zone = document.getElementById("dropzone");
    const maxBytes = Number(form.dataset.maxFileMb || 1024) * 1024 * 1024;
    const waiting = [];
    const all = new Set(); // uploads of the current round, for the overall progress bar
    let running = 0;

    const pending = () => waiting.length + running;

    function add(files) {
      for (const file of files) {
        for (const old of list.querySelectorAll("li")) {
          if (old.dataset.name === file.name) remove(old); // the same name again replaces it
        }
        const li = template.content.firstElementChild.cloneNode(true);
        li.dataset.name = file.name;
        li.querySelector(".name").textContent = file.name;
        li.querySelector(".kind").textContent = guessRole(file);
        li.querySelector(".cancel-upload").setAttribute("aria-label", `Cancel the upload of ${file.name}`);
        list.appendChild(li);
        const upload = { file, li, xhr: null, loaded: 0, total: file.size || 1, done: false };
        li.upload = upload;
        if (file.size > maxBytes) {
          refuse(upload, `${file.name} is ${(file.size / 1048576).toFixed(0)} MiB; a file can be at most ${maxBytes / 1048576} MiB. Make it smaller, or split it.`);
          continue;
        }
        all.add(upload);
        waiting.push(upload);
      }
      pump();
      showTotal();
      markStale();
    }

    function pump() {
      while (running < PARALLEL_UPLOADS && waiting.length) send(waiting.shift());
    }

    function send(upload) {
      running += 1;
      const { file, li } = upload;
      const role = guessRole(file);
      const body = new FormData();
      body.append("name", file.name);
      body.append(role, file, file.name);
      const xhr = new XMLHttpRequest();
      upload.xhr = xhr;
      xhr.open("POST", "/ui/uploads?name=" + encodeURIComponent(file.name));
      xhr.setRequestHeader("HX-Request", "true");
      const token = csrfToken();
      if (token) xhr.setRequestHeader("X-CSRFToken", token);
      li.querySelector(".progress-text").textContent = "uploading";
      xhr.upload.onprogress = (event) => {
        upload.loaded = event.loaded;
        if (event.lengthComputable) upload.total = event.total;
        li.querySelector("progress").value = upload.loaded / upload.total;
        showTotal();
      };
      xhr.onload = () => {
        settle(upload);
        if (xhr.status === 200 || xhr.status === 422) {
          const holder = document.createElement("template");
          holder.innerHTML = xhr.responseText.trim();
          const item = holder.content.firstElementChild;
          if (xhr.status === 200 && item.dataset.role === "image") {
            const thumb = document.createElement("img");
            thumb.className = "preview-thumb";
            thumb.alt = "";
            thumb.src = URL.createObjectURL(file);
            item.insertBefore(thumb, item.firstChild);
          }
          li.replaceWith(item);
        } else {
          const message = xhr.responseText.includes("flash-message")
            ? new DOMParser().parseFromString(xhr.responseText, "text/html").body.textContent.replace("×", "").trim()
            : `the gateway answered ${xhr.status}`;
          refuse(upload, `${file.name}: ${message}`);
        }
      };
      xhr.onerror = () => {
        settle(upload);
        refuse(upload, `The upload of ${file.name} broke off: check the connection, then add the file again.`);
      };
      xhr.onabort = () => settle(upload);
      xhr.send(body);
    }

    function settle(upload) {
      if (upload.done) return;
      upload.done = true;
      upload.loaded = upload.total;
      running -= 1;
      pump();
      showTotal();
    }

    function refuse(upload, message) {
      // Not uploaded, so not in the form: the preview names it as missing if a job needs it.
      const li = upload.li;
      li.className = "upload bad";
      li.querySelector("progress")?.remove();
      const text = li.querySelector(".progress-text");
      text.className = "error-text";
      text.textContent = message;
      const button = li.querySelector(".cancel-upload");
      button.className = "link remove-upload";
      button.textContent = "Remove";
      button.setAttribute("aria-label", `Remove ${upload.file.name}`);
    }

    function remove(li) {
      const upload = li.upload;
      if (upload) {
        const index = waiting.indexOf(upload);
        if (index >= 0) waiting.splice(index, 1);
        if (upload.xhr && !upload.done) upload.xhr.abort();
        all.delete(upload);
      }
      li.remove();
      showTotal();
      markStale();
    }

    function showTotal() {
      const box = document.getElementById("upload-total");
      const bar = document.getElementById("upload-progress");
      const status = document.getElementById("upload-status");
      if (!pending()) {
        box.hidden = true;
        all.clear();
        return;
      }
      let loaded = 0;
      let total = 0;
      for (const upload of all) {
        loaded += upload.loaded;
        total += upload.total;
      }
      box.hidden = false;
      bar.value = total ? loaded / total : 0;
      const left = pending();
      status.textContent = `${left} file${left === 1 ? "" : "s"} to go · ${(loaded / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`;
    }

    function markStale() {
      // A preview shows what the form said then; creating the batch needs a fresh one.
      const preview = document.getElementById("preview");
      if (!preview || !preview.children.length || preview.classList.contains("stale")) return;
      preview.classList.add("stale");
      const create = document.getElementById("create-batch");
      if (create) {
        create.disabled = true;
        const note = document.createElement("p");
        note.className = "alert";
        note.textContent = "The form changed since this preview: preview again before creating the batch.";
        create.parentElement.replaceChildren(note);
      }
    }

    picker.addEventListener("change", () => {
      add([...picker.files]);
      picker.value = ""; // choosing the same file again is a new upload
    });
    list.addEventListener("click", (event) => {
      const button = event.target.closest(".remove-upload, .cancel-upload");
      if (button) remove(button.closest("li"));
    });
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add("over");
      });
    }
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      add([...event.dataTransfer.files]);
    });
    // A file dropped beside the zone must not make the browser leave the page (and the form).
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());

    const manifestFile = document.getElementById("manifest-file");
    manifestFile.addEventListener("change", async () => {
      const file = manifestFile.files[0];
      if (!file) return;
      document.getElementById("manifest").value = await file.text();
      document.getElementById("mode-manifest").checked = true;
      markStale();
    });

    form.addEventListener("input", (event) => {
      if (event.target.type !== "file") markStale();
    });
    form.addEventListener("change", (event) => {
      if (event.target.type !== "file") markStale();
    });

    form.addEventListener("htmx:beforeRequest", (event) => {
      const left = pending();
      if (left) {
        event.preventDefault();
        flashText(`Wait for the uploads to finish (${left} left), then preview again.`);
      } else {
        flash("");
      }
    });
    form.addEventListener("htmx:afterSwap", (event) => {
      const preview = document.getElementById("preview");
      if (event.detail.target.id === "preview" && preview) preview.focus();
    });
  }
})();
