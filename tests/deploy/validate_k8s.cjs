// Validates Kubernetes manifests without a cluster, three ways, and exits 1 naming every problem:
//   1. the API schemas: each object through the validator of its kind from kubernetes-models
//      (generated from the Kubernetes OpenAPI spec) and @kubernetes-models/prometheus-operator
//      (types, required fields, enums);
//   2. unknown fields, which the OpenAPI schemas allow and `kubectl apply` rejects (strict field
//      validation): the objects are written out as typed TypeScript literals and compiled with tsc,
//      whose excess-property check rejects a field the type does not have, at any depth;
//   3. cross-object rules the API server or the controllers apply: names, selectors against pod
//      labels, Service target ports against container ports (named ports only in containers, as
//      the endpoints controller looks them up), volume mounts against volumes, references to
//      ConfigMaps, claims and Services, restart policies, extended resources.
//
//   node validate_k8s.cjs NPM_DIR [--external-claim NAME]... SET...
// Each SET (a folder of .yaml files, or one file) is one deployment, checked on its own; the
// output has a line `valid SET: N objects (kinds)` or lines `INVALID SET: problem` per set, and
// the exit code is 1 when any set has a problem. (One process for many sets: tsc starts once.)
// NPM_DIR holds node_modules with kubernetes-models@4, @kubernetes-models/prometheus-operator@4,
// yaml@2 and typescript@5 (tests/deploy/CMakeLists.txt installs them at test time).
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const args = process.argv.slice(2);
if (args.length < 2) {
  console.error("usage: node validate_k8s.cjs NPM_DIR [--external-claim NAME]... SET...");
  process.exit(2);
}
const npmDir = path.resolve(args.shift());
const npm = createRequire(path.join(npmDir, "package.json"));
const YAML = npm("yaml");
const ts = npm("typescript");
const externalClaims = new Set();
const inputs = [];
while (args.length) {
  const a = args.shift();
  if (a === "--external-claim") externalClaims.add(args.shift());
  else inputs.push(a);
}

// apiVersion -> the module holding its kinds.
const MODULES = {
  "v1": "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "batch/v1": "kubernetes-models/batch/v1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};
const NAMESPACED = new Set(["ConfigMap", "Service", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Job",
  "ServiceMonitor"]);

function files(p) {
  const st = fs.statSync(p);
  if (!st.isDirectory()) return [p];
  return fs.readdirSync(p).filter((f) => /\.ya?ml$/.test(f)).sort().map((f) => path.join(p, f));
}

// Reads a set: its objects, and its YAML problems.
function load(input) {
  const set = { input, objects: [], problems: [] };
  for (const file of files(input)) {
    const docs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"));
    docs.forEach((doc, i) => {
      if (doc.errors.length) {
        set.problems.push(`${path.basename(file)}: document ${i + 1}: YAML: ${doc.errors[0].message}`);
        return;
      }
      const obj = doc.toJS();
      if (obj === null) return;
      const where = `${path.basename(file)}: ${obj.kind || "?"}/${(obj.metadata && obj.metadata.name) || "?"}`;
      set.objects.push({ file, obj, where });
    });
  }
  if (set.objects.length === 0 && set.problems.length === 0) set.problems.push("no Kubernetes object found");
  return set;
}

// 1. Schemas.
function checkSchemas({ objects, problems }) {
  for (const { obj, where } of objects) {
    const moduleName = MODULES[obj.apiVersion];
    if (!moduleName) {
      problems.push(`${where}: apiVersion '${obj.apiVersion}' is not one this validator knows`);
      continue;
    }
    const Model = npm(moduleName)[obj.kind];
    if (typeof Model !== "function") {
      problems.push(`${where}: kind '${obj.kind}' is not in ${obj.apiVersion}`);
      continue;
    }
    try {
      new Model(obj).validate();
    } catch (e) {
      problems.push(`${where}: schema: ${e.message}`);
    }
  }
}

// 2. Unknown fields: one typed constant per object, one .ts file per set, one tsc program.
function checkFields(sets) {
  const dir = fs.mkdtempSync(path.join(npmDir, "check-"));
  const sources = sets.map((set, s) => {
    const file = path.join(dir, `set${s}.ts`);
    const imports = new Set();
    const lines = [];
    set.objects.forEach(({ obj }, i) => {
      const moduleName = MODULES[obj.apiVersion];
      if (!moduleName || !/^[A-Za-z]+$/.test(obj.kind || "")) return;
      imports.add(`import type { I${obj.kind} } from "${moduleName}/${obj.kind}";`);
      lines.push(`export const o${i}: I${obj.kind} = ${JSON.stringify(obj)};`);
    });
    fs.writeFileSync(file, [...imports, ...lines].join("\n") + "\n");
    return file;
  });
  const program = ts.createProgram(sources, {
    noEmit: true, strict: true, skipLibCheck: true, target: ts.ScriptTarget.ES2020,
    module: ts.ModuleKind.Node16, moduleResolution: ts.ModuleResolutionKind.Node16,
  });
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const text = ts.flattenDiagnosticMessageText(d.messageText, " ");
    const s = d.file ? sources.indexOf(path.resolve(d.file.fileName)) : -1;
    const set = sets[s >= 0 ? s : 0];
    let where = "manifests";
    if (d.file && d.start !== undefined) {
      const line = d.file.getLineAndCharacterOfPosition(d.start).line;
      const m = /^export const o(\d+)/.exec(d.file.text.split("\n")[line] || "");
      if (m) where = set.objects[Number(m[1])].where;
    }
    set.problems.push(`${where}: field check: ${text.length > 300 ? text.slice(0, 300) + "..." : text}`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
}

// 3. Cross-object rules.
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const IANA_SVC_NAME = /^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;
const WORKLOADS = ["Deployment", "StatefulSet", "Job"];
const matches = (selector, labels) =>
  Object.entries(selector || {}).every(([k, v]) => labels && labels[k] === v);

function checkRules({ objects, problems }) {
  const byKind = (kind) => objects.filter((o) => o.obj.kind === kind);
  const names = (kind) => new Set(byKind(kind).map((o) => o.obj.metadata && o.obj.metadata.name));

  const namespaces = names("Namespace");
  for (const { obj, where } of objects) {
    const meta = obj.metadata || {};
    const nameRule = ["Service", "Namespace"].includes(obj.kind) ? DNS_LABEL : DNS_SUBDOMAIN;
    if (!meta.name || meta.name.length > (nameRule === DNS_LABEL ? 63 : 253) || !nameRule.test(meta.name))
      problems.push(`${where}: metadata.name '${meta.name}' is not a valid ${obj.kind} name`);
    if (NAMESPACED.has(obj.kind) && namespaces.size && !namespaces.has(meta.namespace))
      problems.push(`${where}: metadata.namespace '${meta.namespace}' is not the rendered Namespace`);
    for (const [k, v] of Object.entries(meta.labels || {})) {
      const slash = k.lastIndexOf("/");
      const prefix = slash < 0 ? "" : k.slice(0, slash), name = k.slice(slash + 1);
      if ((slash >= 0 && (prefix.length > 253 || !DNS_SUBDOMAIN.test(prefix))) || !name || name.length > 63 || !LABEL_VALUE.test(name))
        problems.push(`${where}: label key '${k}' is not a qualified name`);
      if (typeof v !== "string" || v.length > 63 || !LABEL_VALUE.test(v)) problems.push(`${where}: label ${k}: bad value '${v}'`);
    }
  }

  const pods = [];  // {where, labels, podSpec}
  for (const { obj, where } of objects.filter((o) => WORKLOADS.includes(o.obj.kind))) {
    const spec = obj.spec || {};
    const template = spec.template || {};
    const labels = (template.metadata && template.metadata.labels) || {};
    const podSpec = template.spec || {};
    if (obj.kind !== "Job" && !matches(spec.selector && spec.selector.matchLabels, labels))
      problems.push(`${where}: spec.selector does not match the pod template's labels`);
    const policy = podSpec.restartPolicy;
    if (obj.kind === "Job" ? !["OnFailure", "Never"].includes(policy) : policy && policy !== "Always")
      problems.push(`${where}: restartPolicy '${policy}' is not allowed for a ${obj.kind}`);
    const claimTemplates = new Set((spec.volumeClaimTemplates || []).map((c) => c.metadata && c.metadata.name));
    if (obj.kind === "StatefulSet" && !names("Service").has(spec.serviceName))
      problems.push(`${where}: serviceName '${spec.serviceName}' names no rendered Service`);
    const volumes = new Set([...claimTemplates]);
    for (const v of podSpec.volumes || []) {
      if (volumes.has(v.name)) problems.push(`${where}: volume '${v.name}' is defined twice`);
      volumes.add(v.name);
      if (v.configMap && !names("ConfigMap").has(v.configMap.name))
        problems.push(`${where}: volume '${v.name}' names ConfigMap '${v.configMap.name}', which is not rendered`);
      const claim = v.persistentVolumeClaim && v.persistentVolumeClaim.claimName;
      if (claim && !names("PersistentVolumeClaim").has(claim) && !externalClaims.has(claim))
        problems.push(`${where}: volume '${v.name}' names claim '${claim}', which is not rendered`);
    }
    const containers = [...(podSpec.initContainers || []), ...(podSpec.containers || [])];
    const seen = new Set();
    for (const c of containers) {
      const cw = `${where}: container '${c.name}'`;
      if (!DNS_LABEL.test(c.name || "") || seen.has(c.name)) problems.push(`${cw}: name is not a unique DNS label`);
      seen.add(c.name);
      const portNames = new Set();
      for (const p of c.ports || []) {
        if (p.name !== undefined && (p.name.length > 15 || !IANA_SVC_NAME.test(p.name) || portNames.has(p.name)))
          problems.push(`${cw}: port name '${p.name}' is not a unique IANA service name (at most 15 characters)`);
        portNames.add(p.name);
        if (!(p.containerPort >= 1 && p.containerPort <= 65535)) problems.push(`${cw}: containerPort ${p.containerPort} out of range`);
      }
      const paths = new Set();
      for (const m of c.volumeMounts || []) {
        if (!volumes.has(m.name)) problems.push(`${cw}: volumeMount '${m.name}' names no volume`);
        if (paths.has(m.mountPath)) problems.push(`${cw}: mountPath ${m.mountPath} is mounted twice`);
        paths.add(m.mountPath);
      }
      const res = c.resources || {};
      for (const [k, v] of Object.entries(res.requests || {}))
        if (k.includes("/") && (res.limits || {})[k] !== v)
          problems.push(`${cw}: extended resource ${k} needs a limit equal to its request`);
      if (!c.image) problems.push(`${cw}: no image`);
    }
    pods.push({ where, labels, podSpec });
  }

  for (const { obj, where } of byKind("Service")) {
    const spec = obj.spec || {};
    const selected = pods.filter((p) => matches(spec.selector, p.labels));
    if (!spec.selector || selected.length === 0) {
      problems.push(`${where}: selector matches no rendered pod`);
      continue;
    }
    for (const port of spec.ports || []) {
      if (port.name && (port.name.length > 15 || !IANA_SVC_NAME.test(port.name)))
        problems.push(`${where}: port name '${port.name}' is not an IANA service name`);
      const target = port.targetPort === undefined ? port.port : port.targetPort;
      for (const p of selected) {
        // As the endpoints controller: a named port is looked up in the containers only; a number
        // must be a port some container or init container of the pod declares (our own rule).
        const declared = (list) => (list || []).flatMap((c) => c.ports || []);
        const ok = typeof target === "string"
          ? declared(p.podSpec.containers).some((cp) => cp.name === target)
          : declared([...(p.podSpec.containers || []), ...(p.podSpec.initContainers || [])]).some((cp) => cp.containerPort === target);
        if (!ok) problems.push(`${where}: targetPort ${target} is not a port of ${p.where}'s pod`);
      }
    }
  }

  for (const { obj, where } of byKind("ServiceMonitor")) {
    const spec = obj.spec || {};
    const selected = byKind("Service").filter((s) => matches(spec.selector && spec.selector.matchLabels, s.obj.metadata.labels));
    if (selected.length === 0) problems.push(`${where}: selector matches no rendered Service`);
    for (const ns of (spec.namespaceSelector && spec.namespaceSelector.matchNames) || [])
      if (namespaces.size && !namespaces.has(ns)) problems.push(`${where}: namespaceSelector names '${ns}', which is not rendered`);
    for (const e of spec.endpoints || [])
      for (const s of selected)
        if (!(s.obj.spec.ports || []).some((p) => p.name === e.port))
          problems.push(`${where}: endpoint port '${e.port}' is not a port of Service ${s.obj.metadata.name}`);
  }
}

const sets = inputs.map(load);
for (const set of sets) checkSchemas(set);
checkFields(sets);
for (const set of sets) checkRules(set);
let invalid = false;
for (const set of sets) {
  if (set.problems.length) {
    invalid = true;
    for (const p of set.problems) console.log(`INVALID ${set.input}: ${p}`);
  } else {
    const kinds = [...new Set(set.objects.map((o) => o.obj.kind))].join(", ");
    console.log(`valid ${set.input}: ${set.objects.length} objects (${kinds})`);
  }
}
process.exit(invalid ? 1 : 0);
