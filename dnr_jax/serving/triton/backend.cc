// A Triton Inference Server backend that serves the online service's request in
// raw ids with no Python on the path: the body's JSON, the service's checks and
// their one-line errors, the vocabulary, the arrays, the exported ONNX reranker (by
// ONNX Runtime's C API) and the reply's JSON, all in C++.
//
// The model's version folder holds what `repository.py` writes:
//   reranker.onnx  the run's ONNX reranker (`export_reranker(formats=("onnx",))`);
//   vocab.json     the run's vocabulary (`Vocabulary.save`; hashed ids refused);
//   limits.json    `requests.RequestLimits`: list_size, history_size,
//                  max_candidates, score_transform, user_features, item_features.
// A request carries the service's `/rerank` body as input `request` (UINT8, one
// ragged row per request); the reply's output `reply` is the service's JSON reply.
// A bad request gets its own INVALID_ARG error (HTTP 400) with the service's line,
// and the requests batched with it are scored as usual.
//
// The checks follow `dnr_jax/serving/online/requests.py::check_request` line for
// line, and the arrays `batches.encode`; `tests/triton_service_test.py` pins the
// answers to the Python service's. Where RapidJSON reads a body otherwise than
// Python's json module: docs/serving_triton.md.

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "onnxruntime_c_api.h"
#include "rapidjson/document.h"
#include "rapidjson/error/en.h"
#include "rapidjson/stringbuffer.h"
#include "rapidjson/writer.h"
#include "triton/core/tritonbackend.h"

namespace {

using rapidjson::Value;

// kNonPrintable: the code point ranges where Python's str.isprintable() is False.
#include "dnr_printable.inc"

constexpr int kMaxHistory = 10000;  // requests.MAX_HISTORY
const char* const kFields[] = {"list_id", "user_id", "item_ids",
                               "scores",  "history", "features"};

struct BadRequest {
  std::string line;
};

// ---------------------------------------------------------------------------
// Python's repr of a JSON value, as `requests._show` prints it.

std::string PyFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  // The shortest digits that read back as d, as "[-]d.ddde[+-]XX".
  auto end = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific).ptr;
  std::string s(buf, end);
  bool negative = s[0] == '-';
  if (negative) s.erase(0, 1);
  size_t e = s.find('e');
  int exponent = atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char ex[16];
    snprintf(ex, sizeof ex, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += ex;
  } else if (exponent < 0) {
    out = "0." + std::string(-exponent - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exponent + 1) {
    out = digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
  }
  return negative ? "-" + out : out;
}

// Whether Python's str.isprintable() holds for a code point: the ranges that it
// does not hold for come from the Python that built this backend (build.py writes
// dnr_printable.inc), so the two agree on every Unicode version.
bool Printable(uint32_t cp) {
  size_t lo = 0, hi = sizeof(kNonPrintable) / sizeof(kNonPrintable[0]);
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (cp < kNonPrintable[mid][0]) hi = mid;
    else if (cp > kNonPrintable[mid][1]) lo = mid + 1;
    else return false;
  }
  return true;
}

// The code point at s[i] (valid UTF-8, or a surrogate encoded as UTF-8), and its
// length in bytes.
uint32_t Decode(const std::string& s, size_t i, size_t* len) {
  unsigned char c = s[i];
  int n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
  n = std::min<int>(n, s.size() - i);
  uint32_t cp = n == 1 ? c : c & (0xff >> (n + 1));
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
  *len = n;
  return cp;
}

// Python's repr of a str.
std::string PyStr(const std::string& s) {
  bool single = s.find('\'') != std::string::npos;
  bool dbl = s.find('"') != std::string::npos;
  char quote = (single && !dbl) ? '"' : '\'';
  std::string out(1, quote);
  char b[16];
  for (size_t i = 0, len = 1; i < s.size(); i += len) {
    uint32_t cp = Decode(s, i, &len);
    if (cp == '\\') {
      out += "\\\\";
    } else if (cp == static_cast<uint32_t>(quote)) {
      out += '\\';
      out += quote;
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp < 0x20 || cp == 0x7f) {
      snprintf(b, sizeof b, "\\x%02x", cp);
      out += b;
    } else if (cp < 0x7f || Printable(cp)) {
      out.append(s, i, len);
    } else {
      snprintf(b, sizeof b, cp <= 0xff ? "\\x%02x" : cp <= 0xffff ? "\\u%04x" : "\\U%08x",
               cp);
      out += b;
    }
  }
  return out + quote;
}

// Whether text holds a surrogate (U+D800..U+DFFF) encoded as UTF-8: RapidJSON
// reads a lone low-surrogate escape ("\udc00") that way, and Python's text may
// hold one, but no id or reply can.
bool HasSurrogate(const char* text, size_t size) {
  for (size_t i = 0; i + 1 < size; ++i)
    if (static_cast<unsigned char>(text[i]) == 0xed &&
        (static_cast<unsigned char>(text[i + 1]) & 0xe0) == 0xa0)
      return true;
  return false;
}

std::string Str(const Value& v) { return std::string(v.GetString(), v.GetStringLength()); }

void Repr(const Value& v, std::string* out) {
  if (v.IsNull()) {
    *out += "None";
  } else if (v.IsBool()) {
    *out += v.GetBool() ? "True" : "False";
  } else if (v.IsInt64()) {
    *out += std::to_string(v.GetInt64());
  } else if (v.IsUint64()) {
    *out += std::to_string(v.GetUint64());
  } else if (v.IsNumber()) {
    *out += PyFloat(v.GetDouble());
  } else if (v.IsString()) {
    *out += PyStr(Str(v));
  } else if (v.IsArray()) {
    *out += "[";
    for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
      if (i) *out += ", ";
      Repr(v[i], out);
      if (out->size() > 4096) break;  // cut to 40 characters anyway
    }
    *out += "]";
  } else {
    // As Python's dict: each key once, at its first place, with its last value.
    std::vector<std::pair<std::string_view, const Value*>> members;
    std::unordered_map<std::string_view, size_t> at;
    for (auto m = v.MemberBegin(); m != v.MemberEnd(); ++m) {
      std::string_view key(m->name.GetString(), m->name.GetStringLength());
      auto [it, fresh] = at.emplace(key, members.size());
      if (fresh) members.emplace_back(key, &m->value);
      else members[it->second].second = &m->value;
    }
    *out += "{";
    for (size_t i = 0; i < members.size(); ++i) {
      if (i) *out += ", ";
      *out += PyStr(std::string(members[i].first)) + ": ";
      Repr(*members[i].second, out);
      if (out->size() > 4096) break;  // cut to 40 characters anyway
    }
    *out += "}";
  }
}

// The first `count` characters (code points) of UTF-8 text, and its length in them.
size_t CodePoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

std::string FirstCodePoints(const std::string& s, size_t count) {
  size_t n = 0, i = 0;
  for (; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xc0) != 0x80) {
      if (n == count) break;
      ++n;
    }
  }
  return s.substr(0, i);
}

std::string Show(const Value& v) {
  std::string text;
  Repr(v, &text);
  return CodePoints(text) <= 40 ? text : FirstCodePoints(text, 37) + "...";
}

std::string PyList(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + PyStr(names[i]);
  return out + "]";
}

// ---------------------------------------------------------------------------
// What a request may hold, and the vocabulary.

struct Limits {
  int list_size = 0, history_size = 0, max_candidates = 0;
  bool sigmoid = false;
  std::vector<std::string> user_features, item_features;
  std::vector<std::string_view> feature_names;   // user's, then item's: views of the two
};

using Index = std::unordered_map<std::string, int32_t>;

struct Vocabulary {
  std::unordered_map<std::string, Index> columns;
  int32_t Lookup(const Index& index, const std::string& text) const {
    auto it = index.find(text);
    return it == index.end() ? 0 : it->second;
  }
};

// ---------------------------------------------------------------------------
// One checked request (`requests.CheckedRequest`).

struct Checked {
  std::string user;
  std::vector<std::string> items;
  const Value* raw_items = nullptr;  // as sent: echoed back in the reply
  std::vector<double> scores;
  std::vector<std::string> history;
  std::vector<std::pair<int, std::string>> user_features;  // (column, text)
  std::vector<std::pair<int, std::vector<std::string>>> item_features;
  const Value* list_id = nullptr;
};

// Where a value sits, for its error line: `base`, or `base[index]`. Built only
// when there is an error to name.
std::string Where(const std::string& base, long index) {
  return index < 0 ? base : base + "[" + std::to_string(index) + "]";
}

std::string Id(const Value& v, const std::string& base, long index = -1) {
  std::string text;
  if (v.IsString()) {
    text = Str(v);
  } else if (v.IsInt64()) {
    text = std::to_string(v.GetInt64());
  } else if (v.IsUint64()) {
    text = std::to_string(v.GetUint64());
  } else {
    throw BadRequest{Where(base, index) + ": an id is a string or an integer, not " +
                     Show(v)};
  }
  if (text.empty()) throw BadRequest{Where(base, index) + ": empty id"};
  if (HasSurrogate(text.data(), text.size()))
    throw BadRequest{Where(base, index) + ": not valid Unicode text (surrogates not "
                     "allowed)"};
  return text;
}

std::vector<std::string> Ids(const Value& v, const std::string& where) {
  if (!v.IsArray())
    throw BadRequest{where + ": expected a list of ids, got " + Show(v)};
  std::vector<std::string> out;
  out.reserve(v.Size());
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) out.push_back(Id(v[i], where, i));
  return out;
}

double Score(const Value& s, size_t i, bool sigmoid) {
  if (!s.IsNumber())
    throw BadRequest{Where("scores", i) + ": expected a number, got " + Show(s)};
  double d = s.GetDouble();
  if (!std::isfinite(d))
    throw BadRequest{Where("scores", i) + ": non-finite score " + PyFloat(d)};
  if (!sigmoid && !(d >= 0.0 && d <= 1.0)) {
    char g[64];
    snprintf(g, sizeof g, "%g", d);
    throw BadRequest{Where("scores", i) + ": " + g +
                     " is outside [0, 1] (this reranker was trained on scores in "
                     "[0, 1], score_transform=none)"};
  }
  return d;
}

// The members of an object that `names` lists, each with its last value (Python's
// dict keeps the last value of a repeated key), and the first member whose name
// is not listed. Linear in the members: a request cannot make it quadratic.
struct Fields {
  std::vector<const Value*> value;   // per name; nullptr where absent
  const Value* first_unknown = nullptr;
  bool one_unknown_name = true;      // every unlisted member has the first's name

  Fields(const Value& object, const std::vector<std::string_view>& names)
      : value(names.size(), nullptr) {
    for (auto m = object.MemberBegin(); m != object.MemberEnd(); ++m) {
      std::string_view key(m->name.GetString(), m->name.GetStringLength());
      auto it = std::find(names.begin(), names.end(), key);
      if (it != names.end()) {
        value[it - names.begin()] = &m->value;
      } else if (first_unknown == nullptr) {
        first_unknown = &m->name;
      } else if (key != std::string_view(first_unknown->GetString(),
                                         first_unknown->GetStringLength())) {
        one_unknown_name = false;
      }
    }
  }

  // The value of names[i], or nullptr where it is absent or null.
  const Value* Get(size_t i) const {
    return value[i] == nullptr || value[i]->IsNull() ? nullptr : value[i];
  }
};

const std::vector<std::string_view> kFieldNames(std::begin(kFields), std::end(kFields));
enum Field { kListId, kUserId, kItemIds, kScores, kHistory, kFeatures };

Checked Check(const Value& body, const Limits& limits) {
  if (!body.IsObject())
    throw BadRequest{"body: expected a JSON object, got " + Show(body)};
  Fields f(body, kFieldNames);
  if (f.first_unknown != nullptr) {
    std::string name = Str(*f.first_unknown);
    if (name == "lists" && f.one_unknown_name)
      throw BadRequest{"lists: unknown field (one list per request here; post "
                       "several to /rerank_lists)"};
    throw BadRequest{name + ": unknown field (a request has " +
                     PyList(std::vector<std::string>(std::begin(kFields),
                                                     std::end(kFields))) + ")"};
  }
  for (Field field : {kUserId, kItemIds, kScores})
    if (!f.Get(field)) throw BadRequest{std::string(kFields[field]) + ": missing (required)"};
  Checked c;
  c.user = Id(*f.Get(kUserId), "user_id");
  c.items = Ids(*f.Get(kItemIds), "item_ids");
  c.raw_items = f.Get(kItemIds);
  if (c.items.empty())
    throw BadRequest{"item_ids: empty (a list needs at least one candidate)"};
  if (static_cast<int>(c.items.size()) > limits.max_candidates)
    throw BadRequest{"item_ids: " + std::to_string(c.items.size()) +
                     " candidates, more than the " +
                     std::to_string(limits.max_candidates) +
                     " this service takes (max_candidates; the reranker reads the "
                     "first " + std::to_string(limits.list_size) + ")"};
  {
    std::unordered_map<std::string, int> seen;
    for (size_t i = 0; i < c.items.size(); ++i)
      if (!seen.emplace(c.items[i], 0).second)
        throw BadRequest{"item_ids[" + std::to_string(i) + "]: " + PyStr(c.items[i]) +
                         " appears twice in the list"};
  }
  const Value& raw_scores = *f.Get(kScores);
  if (!raw_scores.IsArray())
    throw BadRequest{"scores: expected a list of numbers, got " + Show(raw_scores)};
  if (raw_scores.Size() != c.items.size())
    throw BadRequest{"scores: " + std::to_string(raw_scores.Size()) + " scores for " +
                     std::to_string(c.items.size()) +
                     " item_ids (one score per candidate)"};
  c.scores.reserve(raw_scores.Size());
  for (rapidjson::SizeType i = 0; i < raw_scores.Size(); ++i)
    c.scores.push_back(Score(raw_scores[i], i, limits.sigmoid));
  if (const Value* h = f.Get(kHistory)) c.history = Ids(*h, "history");
  if (static_cast<int>(c.history.size()) > kMaxHistory)
    throw BadRequest{"history: " + std::to_string(c.history.size()) +
                     " items, more than " + std::to_string(kMaxHistory) +
                     " (the reranker reads the last " +
                     std::to_string(limits.history_size) + ")"};
  if (const Value* features = f.Get(kFeatures)) {
    if (!features->IsObject())
      throw BadRequest{"features: expected an object of feature values, got " +
                       Show(*features)};
    // In the order of first appearance, as Python's dict iterates; each feature
    // with its last value; the first name the reranker lacks is refused there.
    Fields ff(*features, limits.feature_names);
    std::vector<bool> done(limits.feature_names.size(), false);
    const size_t users = limits.user_features.size();
    for (auto m = features->MemberBegin(); m != features->MemberEnd(); ++m) {
      std::string name = Str(m->name);
      auto at = std::find(limits.feature_names.begin(), limits.feature_names.end(),
                          std::string_view(name));
      if (at == limits.feature_names.end()) {
        throw BadRequest{"features." + name + ": not a feature of this reranker (it has " +
                         (limits.feature_names.empty()
                              ? std::string("none")
                              : PyList(std::vector<std::string>(
                                    limits.feature_names.begin(),
                                    limits.feature_names.end()))) + ")"};
      }
      size_t j = at - limits.feature_names.begin();
      if (done[j]) continue;
      done[j] = true;
      const Value& value = *ff.value[j];
      if (j < users) {
        c.user_features.emplace_back(j, Id(value, "features." + name));
      } else {
        auto values = Ids(value, "features." + name);
        if (values.size() != c.items.size())
          throw BadRequest{"features." + name + ": " + std::to_string(values.size()) +
                           " values for " + std::to_string(c.items.size()) +
                           " item_ids (one per candidate)"};
        c.item_features.emplace_back(j - users, std::move(values));
      }
    }
  }
  c.list_id = f.Get(kListId);
  return c;
}

// ---------------------------------------------------------------------------
// ONNX Runtime.

const OrtApi* ort = nullptr;

TRITONSERVER_Error* OrtError(OrtStatus* status) {
  if (status == nullptr) return nullptr;
  std::string msg = std::string("ONNX Runtime: ") + ort->GetErrorMessage(status);
  ort->ReleaseStatus(status);
  return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, msg.c_str());
}

#define RETURN_IF_ERROR(X)                  \
  do {                                      \
    TRITONSERVER_Error* e__ = (X);          \
    if (e__ != nullptr) return e__;         \
  } while (false)

TRITONSERVER_Error* Error(const std::string& msg,
                          TRITONSERVER_Error_Code code = TRITONSERVER_ERROR_INVALID_ARG) {
  return TRITONSERVER_ErrorNew(code, msg.c_str());
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream s;
  s << in.rdbuf();
  *out = s.str();
  return true;
}

TRITONSERVER_Error* ReadJson(const std::string& path, rapidjson::Document* doc) {
  std::string text;
  if (!ReadFile(path, &text)) return Error("cannot read " + path, TRITONSERVER_ERROR_NOT_FOUND);
  doc->Parse(text.c_str(), text.size());
  if (doc->HasParseError())
    return Error(path + ": " + rapidjson::GetParseError_En(doc->GetParseError()));
  return nullptr;
}

struct ModelState {
  std::string folder;
  Limits limits;
  Vocabulary vocab;
  const Index* users = nullptr;
  const Index* items = nullptr;
  std::vector<const Index*> user_feature_index, item_feature_index;
  int intra_op_threads = 1;
  OrtEnv* env = nullptr;
  // dnr_unknown_ids_total{model=...}: the ids no vocabulary entry matched (0 where
  // Triton's metrics are off).
  TRITONSERVER_MetricFamily* unknown_family = nullptr;
  TRITONSERVER_Metric* unknown_ids = nullptr;

  ~ModelState() {
    if (env) ort->ReleaseEnv(env);
    if (unknown_ids) TRITONSERVER_ErrorDelete(TRITONSERVER_MetricDelete(unknown_ids));
    if (unknown_family)
      TRITONSERVER_ErrorDelete(TRITONSERVER_MetricFamilyDelete(unknown_family));
  }
};

void CountUnknownIds(ModelState* state, const char* model_name) {
  TRITONSERVER_Error* err = TRITONSERVER_MetricFamilyNew(
      &state->unknown_family, TRITONSERVER_METRIC_KIND_COUNTER, "dnr_unknown_ids_total",
      "Ids of the requests answered that the run's vocabulary does not hold (mapped "
      "to 0)");
  if (err == nullptr) {
    const TRITONSERVER_Parameter* label =
        TRITONSERVER_ParameterNew("model", TRITONSERVER_PARAMETER_STRING, model_name);
    err = TRITONSERVER_MetricNew(&state->unknown_ids, state->unknown_family, &label, 1);
    TRITONSERVER_ParameterDelete(const_cast<TRITONSERVER_Parameter*>(label));
  }
  if (err) {  // metrics off: nothing to count into
    TRITONSERVER_ErrorDelete(err);
    state->unknown_ids = nullptr;
  }
}

uint64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::vector<std::string> StringList(const Value& v) {
  std::vector<std::string> out;
  if (v.IsArray())
    for (auto& s : v.GetArray()) out.push_back(Str(s));
  return out;
}

// What a file the repository holds must have: refused at load, naming the file.
TRITONSERVER_Error* Need(bool ok, const std::string& file, const char* what) {
  return ok ? nullptr
            : Error(file + ": " + what + " (write the repository with "
                    "dnr_jax.serving.triton.repository)");
}

bool IsStringList(const Value& v) {
  if (!v.IsArray()) return false;
  for (const auto& x : v.GetArray())
    if (!x.IsString()) return false;
  return true;
}

TRITONSERVER_Error* LoadModel(TRITONBACKEND_Model* model, ModelState* state) {
  const char* location;
  TRITONBACKEND_ArtifactType type;
  RETURN_IF_ERROR(TRITONBACKEND_ModelRepository(model, &type, &location));
  uint64_t version;
  RETURN_IF_ERROR(TRITONBACKEND_ModelVersion(model, &version));
  state->folder = std::string(location) + "/" + std::to_string(version);

  TRITONSERVER_Message* message;
  RETURN_IF_ERROR(TRITONBACKEND_ModelConfig(model, 1, &message));
  const char* base;
  size_t size;
  TRITONSERVER_Error* serialized = TRITONSERVER_MessageSerializeToJson(message, &base,
                                                                        &size);
  rapidjson::Document config;
  if (serialized == nullptr) config.Parse(base, size);
  TRITONSERVER_ErrorDelete(TRITONSERVER_MessageDelete(message));
  RETURN_IF_ERROR(serialized);
  if (config.IsObject() && config.HasMember("parameters") &&
      config["parameters"].IsObject() &&
      config["parameters"].HasMember("intra_op_threads")) {
    const Value& p = config["parameters"]["intra_op_threads"];
    RETURN_IF_ERROR(Need(p.IsObject() && p.HasMember("string_value") &&
                         p["string_value"].IsString(), "config.pbtxt",
                         "parameter intra_op_threads needs a string_value"));
    state->intra_op_threads = atoi(p["string_value"].GetString());
  }

  const std::string lfile = state->folder + "/limits.json";
  rapidjson::Document limits;
  RETURN_IF_ERROR(ReadJson(lfile, &limits));
  RETURN_IF_ERROR(Need(limits.IsObject(), lfile, "not a JSON object"));
  for (const char* key : {"list_size", "history_size", "max_candidates"})
    RETURN_IF_ERROR(Need(limits.HasMember(key) && limits[key].IsInt() &&
                         limits[key].GetInt() >= 1, lfile,
                         "list_size, history_size and max_candidates must be "
                         "integers >= 1"));
  RETURN_IF_ERROR(Need(limits.HasMember("score_transform") &&
                       limits["score_transform"].IsString(), lfile,
                       "score_transform must be a string"));
  for (const char* key : {"user_features", "item_features"})
    RETURN_IF_ERROR(Need(limits.HasMember(key) && IsStringList(limits[key]), lfile,
                         "user_features and item_features must be lists of names"));
  Limits& l = state->limits;
  l.list_size = limits["list_size"].GetInt();
  l.history_size = limits["history_size"].GetInt();
  l.max_candidates = limits["max_candidates"].GetInt();
  RETURN_IF_ERROR(Need(l.max_candidates >= l.list_size, lfile,
                       "max_candidates must be >= list_size"));
  l.sigmoid = std::string(limits["score_transform"].GetString()) == "sigmoid";
  l.user_features = StringList(limits["user_features"]);
  l.item_features = StringList(limits["item_features"]);
  for (const auto* names : {&l.user_features, &l.item_features})
    for (const auto& name : *names) l.feature_names.emplace_back(name);

  const std::string vfile = state->folder + "/vocab.json";
  rapidjson::Document vocab;
  RETURN_IF_ERROR(ReadJson(vfile, &vocab));
  RETURN_IF_ERROR(Need(vocab.IsObject(), vfile, "not a JSON object"));
  if (vocab.HasMember("buckets") && vocab["buckets"].IsInt() && vocab["buckets"].GetInt())
    return Error("vocab.json: hashed ids (buckets > 0) are not served by this backend",
                 TRITONSERVER_ERROR_UNSUPPORTED);
  RETURN_IF_ERROR(Need(vocab.HasMember("columns") && vocab["columns"].IsObject(), vfile,
                       "columns must be an object of id lists"));
  for (auto m = vocab["columns"].MemberBegin(); m != vocab["columns"].MemberEnd(); ++m) {
    RETURN_IF_ERROR(Need(IsStringList(m->value), vfile,
                         "each column must be a list of ids (text)"));
    Index& index = state->vocab.columns[Str(m->name)];
    int32_t id = 1;
    for (auto& text : m->value.GetArray()) index.emplace(Str(text), id++);
  }
  auto column = [&](const std::string& name, const Index** out) -> TRITONSERVER_Error* {
    auto it = state->vocab.columns.find(name);
    if (it == state->vocab.columns.end())
      return Error("vocab.json has no column " + name);
    *out = &it->second;
    return nullptr;
  };
  RETURN_IF_ERROR(column("user", &state->users));
  RETURN_IF_ERROR(column("item", &state->items));
  for (auto* names : {&l.user_features, &l.item_features}) {
    auto& out = names == &l.user_features ? state->user_feature_index
                                          : state->item_feature_index;
    for (const auto& name : *names) {
      const Index* index;
      RETURN_IF_ERROR(column(name, &index));
      out.push_back(index);
    }
  }
  RETURN_IF_ERROR(OrtError(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "dnr", &state->env)));
  const char* name;
  RETURN_IF_ERROR(TRITONBACKEND_ModelName(model, &name));
  CountUnknownIds(state, name);
  return nullptr;
}

struct InstanceState {
  ModelState* model = nullptr;
  // The parsed bodies of a batch live in this buffer (more is allocated only for
  // bodies that outgrow it), instead of chunks allocated per request.
  std::vector<char> parse_buffer = std::vector<char>(1 << 20);
  OrtSession* session = nullptr;
  OrtMemoryInfo* memory = nullptr;

  ~InstanceState() {
    if (session) ort->ReleaseSession(session);
    if (memory) ort->ReleaseMemoryInfo(memory);
  }
};

// ---------------------------------------------------------------------------
// A batch of checked requests as the reranker's arrays (`batches.encode`), scored.

struct Batch {
  int b, n, h, nu, ni;
  std::vector<int32_t> user, history, items, user_features, item_features;
  std::vector<uint8_t> history_mask, mask;  // ONNX bool: one byte each
  std::vector<float> scores;
  std::vector<int> kept, unknown;
};

void Encode(const ModelState& m, const std::vector<const Checked*>& requests, Batch* out) {
  const Limits& l = m.limits;
  Batch& x = *out;
  x.b = requests.size();
  x.n = l.list_size;
  x.h = l.history_size;
  x.nu = l.user_features.size();
  x.ni = l.item_features.size();
  x.user.assign(x.b, 0);
  x.history.assign(x.b * x.h, 0);
  x.history_mask.assign(x.b * x.h, 0);
  x.items.assign(x.b * x.n, 0);
  x.scores.assign(x.b * x.n, 0.f);
  x.mask.assign(x.b * x.n, 0);
  x.user_features.assign(x.b * x.nu, 0);
  x.item_features.assign(x.b * x.n * x.ni, 0);
  x.kept.assign(x.b, 0);
  x.unknown.assign(x.b, 0);
  for (int i = 0; i < x.b; ++i) {
    const Checked& r = *requests[i];
    int k = std::min<int>(r.items.size(), x.n);
    x.kept[i] = k;
    int unknown = 0;
    for (int s = 0; s < k; ++s) {
      int32_t id = m.vocab.Lookup(*m.items, r.items[s]);
      unknown += id == 0;
      x.items[i * x.n + s] = id;
      double score = r.scores[s];
      // In double, then cast: the file reader's order, so both give the same bits.
      if (l.sigmoid) score = 1.0 / (1.0 + std::exp(-score));
      x.scores[i * x.n + s] = static_cast<float>(score);
      x.mask[i * x.n + s] = 1;
    }
    x.user[i] = m.vocab.Lookup(*m.users, r.user);
    unknown += x.user[i] == 0;
    for (const auto& [j, text] : r.user_features) {
      int32_t id = m.vocab.Lookup(*m.user_feature_index[j], text);
      unknown += id == 0;
      x.user_features[i * x.nu + j] = id;
    }
    for (const auto& [j, values] : r.item_features) {
      for (int s = 0; s < k; ++s) {
        int32_t id = m.vocab.Lookup(*m.item_feature_index[j], values[s]);
        unknown += id == 0;
        x.item_features[(i * x.n + s) * x.ni + j] = id;
      }
    }
    // Unknown ids dropped, the last H known ones kept, right-aligned.
    std::vector<int32_t> known;
    known.reserve(r.history.size());
    for (const auto& text : r.history) {
      int32_t id = m.vocab.Lookup(*m.items, text);
      if (id) known.push_back(id); else ++unknown;
    }
    int take = std::min<int>(known.size(), x.h);
    for (int t = 0; t < take; ++t) {
      x.history[i * x.h + x.h - take + t] = known[known.size() - take + t];
      x.history_mask[i * x.h + x.h - take + t] = 1;
    }
    x.unknown[i] = unknown;
  }
}

TRITONSERVER_Error* Score(OrtSession* session, const OrtMemoryInfo* memory, Batch* x,
                          std::vector<float>* logits) {
  int64_t b = x->b, n = x->n, h = x->h, nu = x->nu, ni = x->ni;
  struct In {
    const char* name;
    void* data;
    size_t bytes;
    std::vector<int64_t> shape;
    ONNXTensorElementDataType type;
  };
  const auto i32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  const auto bl = ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  std::vector<In> ins = {
      {"user", x->user.data(), x->user.size() * 4, {b}, i32},
      {"history", x->history.data(), x->history.size() * 4, {b, h}, i32},
      {"history_mask", x->history_mask.data(), x->history_mask.size(), {b, h}, bl},
      {"items", x->items.data(), x->items.size() * 4, {b, n}, i32},
      {"scores", x->scores.data(), x->scores.size() * 4, {b, n},
       ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {"mask", x->mask.data(), x->mask.size(), {b, n}, bl},
      {"user_features", x->user_features.data(), x->user_features.size() * 4, {b, nu}, i32},
      {"item_features", x->item_features.data(), x->item_features.size() * 4,
       {b, n, ni}, i32}};
  std::vector<OrtValue*> values(ins.size(), nullptr);
  std::vector<const char*> names;
  OrtValue* output = nullptr;
  TRITONSERVER_Error* err = nullptr;
  for (size_t i = 0; i < ins.size() && err == nullptr; ++i) {
    names.push_back(ins[i].name);
    err = OrtError(ort->CreateTensorWithDataAsOrtValue(
        memory, ins[i].data, ins[i].bytes, ins[i].shape.data(), ins[i].shape.size(),
        ins[i].type, &values[i]));
  }
  const char* out_name = "logits";
  if (err == nullptr)
    err = OrtError(ort->Run(session, nullptr, names.data(), values.data(),
                            values.size(), &out_name, 1, &output));
  size_t count = 0;
  if (err == nullptr) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    err = OrtError(ort->GetTensorTypeAndShape(output, &info));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (err == nullptr) err = OrtError(ort->GetTensorElementType(info, &type));
    if (err == nullptr) err = OrtError(ort->GetTensorShapeElementCount(info, &count));
    if (info) ort->ReleaseTensorTypeAndShapeInfo(info);
    if (err == nullptr && (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
                           count != static_cast<size_t>(b * n)))
      err = Error("the model's logits are not float32 [b, n] (" + std::to_string(count) +
                  " values for " + std::to_string(b * n) + ")",
                  TRITONSERVER_ERROR_INTERNAL);
  }
  if (err == nullptr) {
    float* data;
    err = OrtError(ort->GetTensorMutableData(output, reinterpret_cast<void**>(&data)));
    if (err == nullptr) logits->assign(data, data + b * n);
  }
  for (auto* v : values)
    if (v) ort->ReleaseValue(v);
  if (output) ort->ReleaseValue(output);
  return err;
}

// The service's reply (`batches.replies`): the reranked candidates by logit
// (ties by upstream position), then those past n in upstream order with null.
using JsonWriter = rapidjson::Writer<rapidjson::StringBuffer>;

// A double as orjson writes a Python float: the shortest digits that read back as
// it, an integral one with ".0" (a float stays a float); null where not finite.
void WriteDouble(JsonWriter& w, double d) {
  if (!std::isfinite(d)) {
    w.Null();
    return;
  }
  char number[64];
  char* end = std::to_chars(number, number + sizeof number - 2, d).ptr;
  if (std::string_view(number, end - number).find_first_of(".e") ==
      std::string_view::npos) {
    *end++ = '.';
    *end++ = '0';
  }
  w.RawValue(number, end - number, rapidjson::kNumberType);
}

// Text with a surrogate in it, as Python's json module writes it ("\udc00").
void WriteSurrogateText(JsonWriter& w, const char* text, size_t size,
                        rapidjson::Type type) {
  std::string s(text, size), out = "\"";
  char b[16];
  for (size_t i = 0, len = 1; i < s.size(); i += len) {
    uint32_t cp = Decode(s, i, &len);
    if (cp == '"' || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp < 0x20 || (cp >= 0xd800 && cp <= 0xdfff)) {
      snprintf(b, sizeof b, "\\u%04x", cp);
      out += b;
    } else {
      out.append(s, i, len);
    }
  }
  out += '"';
  w.RawValue(out.data(), out.size(), type);
}

// A value sent back as the service sends it: as Python reads the body (each key of
// an object once, with its last value) and orjson writes the reply (a non-finite
// number as null).
void WriteEcho(JsonWriter& w, const Value& v) {
  if (v.IsNull()) {
    w.Null();
  } else if (v.IsBool()) {
    w.Bool(v.GetBool());
  } else if (v.IsInt64()) {
    w.Int64(v.GetInt64());
  } else if (v.IsUint64()) {
    w.Uint64(v.GetUint64());
  } else if (v.IsNumber()) {
    WriteDouble(w, v.GetDouble());
  } else if (v.IsString()) {
    if (HasSurrogate(v.GetString(), v.GetStringLength()))
      WriteSurrogateText(w, v.GetString(), v.GetStringLength(), rapidjson::kStringType);
    else
      w.String(v.GetString(), v.GetStringLength());
  } else if (v.IsArray()) {
    w.StartArray();
    for (const auto& x : v.GetArray()) WriteEcho(w, x);
    w.EndArray();
  } else {
    std::vector<std::pair<const Value*, const Value*>> members;   // (key, last value)
    std::unordered_map<std::string_view, size_t> at;
    for (auto m = v.MemberBegin(); m != v.MemberEnd(); ++m) {
      std::string_view key(m->name.GetString(), m->name.GetStringLength());
      auto [it, fresh] = at.emplace(key, members.size());
      if (fresh) members.emplace_back(&m->name, &m->value);
      else members[it->second].second = &m->value;
    }
    w.StartObject();
    for (const auto& [key, value] : members) {
      if (HasSurrogate(key->GetString(), key->GetStringLength()))
        WriteSurrogateText(w, key->GetString(), key->GetStringLength(),
                           rapidjson::kStringType);
      else
        w.Key(key->GetString(), key->GetStringLength());
      WriteEcho(w, *value);
    }
    w.EndObject();
  }
}

// The service's reply (`batches.replies`): the reranked candidates by logit
// (ties by upstream position, a NaN logit last: `scorer.rerank_order`), then those
// past n in upstream order with null.
std::string Reply(const Checked& r, const float* logits, int kept, int unknown) {
  std::vector<int> order(kept);
  for (int s = 0; s < kept; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return (!std::isnan(logits[a]) && std::isnan(logits[b])) || logits[a] > logits[b];
  });
  rapidjson::StringBuffer buffer;
  JsonWriter w(buffer);
  w.StartObject();
  w.Key("list_id");
  if (r.list_id) WriteEcho(w, *r.list_id); else w.Null();
  w.Key("item_ids");
  w.StartArray();
  const Value& raw = *r.raw_items;   // ids as sent: checked, so strings or integers
  for (int s : order) WriteEcho(w, raw[s]);
  for (rapidjson::SizeType s = kept; s < raw.Size(); ++s) WriteEcho(w, raw[s]);
  w.EndArray();
  w.Key("scores");
  w.StartArray();
  // The float32 logit as a double, as the service writes it.
  for (int s : order) WriteDouble(w, static_cast<double>(logits[s]));
  for (size_t s = kept; s < r.items.size(); ++s) w.Null();
  w.EndArray();
  w.Key("reranked");
  w.Int(kept);
  w.Key("unknown_ids");
  w.Int(unknown);
  w.EndObject();
  return std::string(buffer.GetString(), buffer.GetSize());
}

TRITONSERVER_Error* RequestBody(TRITONBACKEND_Request* request, std::string* body) {
  TRITONBACKEND_Input* input;
  RETURN_IF_ERROR(TRITONBACKEND_RequestInput(request, "request", &input));
  uint64_t byte_size;
  uint32_t buffers;
  RETURN_IF_ERROR(TRITONBACKEND_InputProperties(input, nullptr, nullptr, nullptr,
                                                nullptr, &byte_size, &buffers));
  body->clear();
  body->reserve(byte_size);
  for (uint32_t i = 0; i < buffers; ++i) {
    const void* data;
    uint64_t size;
    TRITONSERVER_MemoryType memory_type = TRITONSERVER_MEMORY_CPU;
    int64_t memory_id = 0;
    RETURN_IF_ERROR(TRITONBACKEND_InputBuffer(input, i, &data, &size, &memory_type,
                                              &memory_id));
    if (memory_type == TRITONSERVER_MEMORY_GPU)
      return Error("request: a GPU buffer (send the body from host memory)");
    body->append(static_cast<const char*>(data), size);
  }
  return nullptr;
}

TRITONSERVER_Error* SendReply(TRITONBACKEND_Response* response, const std::string& text) {
  TRITONBACKEND_Output* output;
  int64_t shape[2] = {1, static_cast<int64_t>(text.size())};
  RETURN_IF_ERROR(TRITONBACKEND_ResponseOutput(response, &output, "reply",
                                               TRITONSERVER_TYPE_UINT8, shape, 2));
  void* buffer;
  TRITONSERVER_MemoryType memory_type = TRITONSERVER_MEMORY_CPU;
  int64_t memory_id = 0;
  RETURN_IF_ERROR(TRITONBACKEND_OutputBuffer(output, &buffer, text.size(), &memory_type,
                                             &memory_id));
  if (memory_type == TRITONSERVER_MEMORY_GPU)
    return Error("reply: Triton gave a GPU buffer", TRITONSERVER_ERROR_INTERNAL);
  memcpy(buffer, text.data(), text.size());
  return nullptr;
}

// Times of one execution, for Triton's statistics and metrics.
struct Times {
  uint64_t exec_start = 0, compute_start = 0, compute_end = 0;
};

void Send(TRITONBACKEND_ModelInstance* instance, const Times& times,
          TRITONBACKEND_Request* request, TRITONSERVER_Error* error,
          const std::string* reply) {
  TRITONBACKEND_Response* response = nullptr;
  TRITONSERVER_Error* made = TRITONBACKEND_ResponseNew(&response, request);
  if (made == nullptr) {
    if (error == nullptr && reply != nullptr) error = SendReply(response, *reply);
    TRITONSERVER_Error* sent =
        TRITONBACKEND_ResponseSend(response, TRITONSERVER_RESPONSE_COMPLETE_FINAL, error);
    if (sent) TRITONSERVER_ErrorDelete(sent);
  } else {
    TRITONSERVER_ErrorDelete(made);
  }
  bool success = error == nullptr;
  if (error) TRITONSERVER_ErrorDelete(error);
  uint64_t start = times.compute_start ? times.compute_start : times.exec_start;
  uint64_t end = times.compute_end ? times.compute_end : start;
  TRITONSERVER_Error* reported = TRITONBACKEND_ModelInstanceReportStatistics(
      instance, request, success, times.exec_start, start, end, Now());
  if (reported) TRITONSERVER_ErrorDelete(reported);
  TRITONSERVER_Error* released =
      TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL);
  if (released) TRITONSERVER_ErrorDelete(released);
}


// Bodies nested deeper than this are refused as Python's json module refuses them
// (RecursionError; the service's "nested too deeply"). RapidJSON's iterative parser
// reads any depth, but the checks' recursive steps would then run out of stack.
constexpr int kMaxDepth = 1000;

bool TooDeep(const std::string& body) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// Python's bytes.strip() whitespace: a body of nothing else is "missing".
bool Blank(const std::string& body) {
  return body.find_first_not_of(" \t\n\r\x0b\x0c") == std::string::npos;
}

// One body's check: nullptr and `checked` filled, or the error to answer with.
TRITONSERVER_Error* ReadAndCheck(const std::string& body, const Limits& limits,
                                 rapidjson::Document* doc, Checked* checked) {
  if (Blank(body)) return Error("body: missing (send one list as a JSON object)");
  if (TooDeep(body)) return Error("body: malformed JSON (nested too deeply)");
  constexpr unsigned kFlags = rapidjson::kParseNanAndInfFlag |
                              rapidjson::kParseValidateEncodingFlag |
                              rapidjson::kParseIterativeFlag |
                              rapidjson::kParseFullPrecisionFlag;
  doc->Parse<kFlags>(body.c_str(), body.size());
  if (doc->HasParseError())
    return Error(std::string("body: malformed JSON (") +
                 rapidjson::GetParseError_En(doc->GetParseError()) + " at byte " +
                 std::to_string(doc->GetErrorOffset()) + ")");
  try {
    *checked = Check(*doc, limits);
  } catch (const BadRequest& bad) {
    return Error(bad.line);
  }
  return nullptr;
}

}  // namespace

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (ort == nullptr)
    return Error("the ONNX Runtime library is older than the API version this backend "
                 "was built for (" + std::to_string(ORT_API_VERSION) + ")",
                 TRITONSERVER_ERROR_UNSUPPORTED);
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  try {
    auto state = std::make_unique<ModelState>();
    RETURN_IF_ERROR(LoadModel(model, state.get()));
    RETURN_IF_ERROR(TRITONBACKEND_ModelSetState(model, state.get()));
    state.release();
    return nullptr;
  } catch (const std::exception& e) {
    return Error(std::string("loading the model: ") + e.what(),
                 TRITONSERVER_ERROR_INTERNAL);
  }
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelState(model, &vstate));
  delete static_cast<ModelState*>(vstate);
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(
    TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model;
  RETURN_IF_ERROR(TRITONBACKEND_ModelInstanceModel(instance, &model));
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelState(model, &vstate));
  auto st = std::make_unique<InstanceState>();
  st->model = static_cast<ModelState*>(vstate);
  OrtSessionOptions* options;
  RETURN_IF_ERROR(OrtError(ort->CreateSessionOptions(&options)));
  TRITONSERVER_Error* err = OrtError(ort->SetIntraOpNumThreads(
      options, st->model->intra_op_threads));
  if (err == nullptr) err = OrtError(ort->SetInterOpNumThreads(options, 1));
  // Waiting intra-op threads spin by default, on the cores the front end needs.
  if (err == nullptr)
    err = OrtError(ort->AddSessionConfigEntry(options, "session.intra_op.allow_spinning",
                                              "0"));
  std::string path = st->model->folder + "/reranker.onnx";
  if (err == nullptr)
    err = OrtError(ort->CreateSession(st->model->env, path.c_str(), options, &st->session));
  ort->ReleaseSessionOptions(options);
  RETURN_IF_ERROR(err);   // st's destructor releases what was made
  RETURN_IF_ERROR(OrtError(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault,
                                                    &st->memory)));
  RETURN_IF_ERROR(TRITONBACKEND_ModelInstanceSetState(instance, st.get()));
  st.release();
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(
    TRITONBACKEND_ModelInstance* instance) {
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelInstanceState(instance, &vstate));
  delete static_cast<InstanceState*>(vstate);
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests,
    const uint32_t request_count) {
  void* vstate;
  RETURN_IF_ERROR(TRITONBACKEND_ModelInstanceState(instance, &vstate));
  auto* st = static_cast<InstanceState*>(vstate);
  const ModelState& m = *st->model;
  Times times;
  times.exec_start = Now();
  // The requests not yet answered (and released): an exception answers them all.
  std::vector<TRITONBACKEND_Request*> held(requests, requests + request_count);
  try {
    // Each request's parsed body must outlive its Checked (which points into it).
    rapidjson::MemoryPoolAllocator<> pool(st->parse_buffer.data(),
                                         st->parse_buffer.size());
    std::vector<rapidjson::Document> docs;
    docs.reserve(request_count);
    for (uint32_t r = 0; r < request_count; ++r) docs.emplace_back(&pool);
    std::vector<Checked> checked(request_count);
    std::vector<const Checked*> good;
    std::vector<uint32_t> good_index;
    std::string body;
    for (uint32_t r = 0; r < request_count; ++r) {
      TRITONSERVER_Error* error = RequestBody(held[r], &body);
      if (error == nullptr) error = ReadAndCheck(body, m.limits, &docs[r], &checked[r]);
      if (error == nullptr) {
        good.push_back(&checked[r]);
        good_index.push_back(r);
      } else {
        Send(instance, times, held[r], error, nullptr);   // refused alone
        held[r] = nullptr;
      }
    }
    if (good.empty()) return nullptr;
    std::vector<float> logits;
    Batch batch;
    times.compute_start = Now();
    Encode(m, good, &batch);
    TRITONSERVER_Error* scored = Score(st->session, st->memory, &batch, &logits);
    times.compute_end = Now();
    for (size_t g = 0; g < good.size(); ++g) {
      uint32_t r = good_index[g];
      if (scored) {
        Send(instance, times, held[r],
             TRITONSERVER_ErrorNew(TRITONSERVER_ErrorCode(scored),
                                   TRITONSERVER_ErrorMessage(scored)),
             nullptr);
      } else {
        std::string reply = Reply(*good[g], logits.data() + g * batch.n, batch.kept[g],
                                  batch.unknown[g]);
        if (m.unknown_ids && batch.unknown[g]) {
          TRITONSERVER_Error* counted =
              TRITONSERVER_MetricIncrement(m.unknown_ids, batch.unknown[g]);
          if (counted) TRITONSERVER_ErrorDelete(counted);
        }
        Send(instance, times, held[r], nullptr, &reply);
      }
      held[r] = nullptr;
    }
    if (scored) TRITONSERVER_ErrorDelete(scored);
    TRITONSERVER_Error* reported = TRITONBACKEND_ModelInstanceReportBatchStatistics(
        instance, good.size(), times.exec_start, times.compute_start,
        times.compute_end, Now());
    if (reported) TRITONSERVER_ErrorDelete(reported);
  } catch (const std::exception& e) {
    for (auto* request : held)
      if (request)
        Send(instance, times, request,
             Error(std::string("internal error: ") + e.what(),
                   TRITONSERVER_ERROR_INTERNAL),
             nullptr);
  }
  return nullptr;
}

}  // extern "C"
