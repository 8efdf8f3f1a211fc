// Which words of a text answer a query, by the server's rules (app/hebrew.py), for highlighting.
// It only finds ranges: app.js builds the <mark> elements with textContent, never HTML.
"use strict";
window.memfitHebrew = (function () {
  // The prefix rules come from app/hebrew.py through the page (<body data-*>), written once.
  const data = document.body.dataset;
  const PREFIX_LETTERS = data.prefixLetters || "והבכלמש";
  const MAX_PREFIXES = Number(data.maxPrefixes || 3);
  const MIN_STEM = Number(data.minStem || 2);
  const HEBREW_LETTERS = data.hebrewLetters || "אבגדהוזחטיכךלמםנןסעפףצץקרשת";
  const FINAL_FORMS = data.finalForms || "ךםןףץ";

  // The same character classes as app/hebrew.py (_MARKS, _QUOTES, _INVISIBLE, _TERM).
  const MARKS = /[\u0591-\u05af\u05b0-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7]/gu;
  const QUOTES = /[\u05f3\u05f4'"`\u2019\u201d]/gu;
  const INVISIBLE = /[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/gu;
  const WORD = /[\p{L}\p{N}]+/gu;
  // A run of the original text that normalises to one or more words: letters with their marks and
  // the quotes of abbreviations (צה"ל). Maqaf, spaces and punctuation end a run, as on the server.
  const RUN = /[\p{L}\p{N}_\p{M}\u05f3\u05f4'"`\u2019\u201d]+/gu;
  const EDGE_QUOTES = /^[\u05f3\u05f4'"`\u2019\u201d]+|[\u05f3\u05f4'"`\u2019\u201d]+$/gu;

  function normalize(text) {
    return (text || "").normalize("NFC").replace(MARKS, "").replace(INVISIBLE, " ").replace(QUOTES, "")
      .replace(/\u05be/g, " ").toLowerCase();
  }

  // The words of a text as the server reads them (hebrew.raw_terms).
  function words(text) {
    return normalize(text).match(WORD) || [];
  }

  // The word and its forms without one to MAX_PREFIXES leading prefix letters (והספרים: הספרים, ספרים),
  // by app/hebrew.py's prefix_stems: Hebrew words only, a stem of MIN_STEM letters or more that never
  // starts with a final letter (מלך is not מ + לך).
  function stems(word) {
    const forms = [word];
    if (![...word].every((ch) => HEBREW_LETTERS.includes(ch))) return forms;
    let current = word;
    for (let i = 0; i < MAX_PREFIXES; i++) {
      if (current.length - 1 < MIN_STEM || !PREFIX_LETTERS.includes(current[0]) || FINAL_FORMS.includes(current[1])) break;
      current = current.slice(1);
      forms.push(current);
    }
    return forms;
  }

  // 1 exact, 0.8 through prefixes, 0.4 the query word inside the document word, else 0.
  function wordScore(queryWord, docWord) {
    if (queryWord === docWord) return 1;
    const docForms = stems(docWord);
    if (stems(queryWord).some((form) => docForms.includes(form))) return 0.8;
    if (queryWord.length >= 2 && docWord.includes(queryWord)) return 0.4;
    return 0;
  }

  // The text cut into [{text, match}] pieces that join back to it exactly; match marks a word that
  // answers one of the query's words. Niqqud inside a matched word stays inside the mark.
  function segments(text, query) {
    const queryWords = [...new Set(words(query))];
    const pieces = [];
    let last = 0;
    const push = (piece, match) => {
      if (!piece) return;
      const previous = pieces[pieces.length - 1];
      if (previous && previous.match === match) previous.text += piece;
      else pieces.push({ text: piece, match });
    };
    for (const run of (text || "").matchAll(RUN)) {
      const docWords = words(run[0]);
      if (!docWords.some((w) => queryWords.some((q) => wordScore(q, w) > 0))) continue;
      const core = run[0].replace(EDGE_QUOTES, "");
      const start = run.index + run[0].indexOf(core);
      push(text.slice(last, start), false);
      push(core, true);
      last = start + core.length;
    }
    push((text || "").slice(last), false);
    return pieces;
  }

  return { normalize, words, stems, wordScore, segments };
})();
