// A client written apart from tlbuild, as a Node integrator would: sharp (libvips) decodes,
// onnxruntime-node runs. Usage: node node_client.mjs FOLDER LIST OUT.jsonl
//   FOLDER: a tlbuild export folder; LIST: one image path per line.
// For each image, one JSON line: the logits of model_image.onnx and of each model_image twin
// (decode only: upright, alpha flattened on white, 8-bit RGB) and of model.onnx fed by sharp's
// own resize (kernel cubic) and the manifest's mean and std.
import fs from "node:fs";
import path from "node:path";
import ort from "onnxruntime-node";
import sharp from "sharp";

const [folder, list, out] = process.argv.slice(2);
const manifest = JSON.parse(fs.readFileSync(path.join(folder, "manifest.json"), "utf8"));
const pre = manifest.preprocessing;
const [h, w] = pre.input_size;
const twins = Object.values(manifest.image_models || {}).map((r) => r.file).filter(Boolean);
const sessions = {};
for (const name of [...twins, "model.onnx"]) {
  sessions[name] = await ort.InferenceSession.create(path.join(folder, name));
}

async function decode(file) {
  // rotate() with no angle applies the EXIF orientation; flatten composites alpha on white.
  const { data, info } = await sharp(file)
    .rotate()
    .flatten({ background: "#ffffff" })
    .toColourspace("srgb")
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`${file}: ${info.channels} channels`);
  return { data, width: info.width, height: info.height };
}

async function floatInput(file) {
  const { data } = await sharp(file)
    .rotate()
    .flatten({ background: "#ffffff" })
    .toColourspace("srgb")
    .resize(w, h, { fit: "fill", kernel: "cubic" })
    .raw()
    .toBuffer({ resolveWithObject: true });
  const x = new Float32Array(3 * h * w);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < h * w; i++) {
      x[c * h * w + i] = (data[i * 3 + c] / 255 - pre.mean[c]) / pre.std[c];
    }
  }
  return x;
}

const lines = fs.readFileSync(list, "utf8").split("\n").filter((l) => l.trim());
const sink = fs.createWriteStream(out);
for (const file of lines) {
  const row = { path: file };
  const img = await decode(file);
  const image = new ort.Tensor("uint8", img.data, [1, img.height, img.width, 3]);
  for (const name of twins) {
    const res = await sessions[name].run({ image });
    row[name] = Array.from(res[sessions[name].outputNames[0]].data);
  }
  const s = sessions["model.onnx"];
  const x = new ort.Tensor("float32", await floatInput(file), [1, 3, h, w]);
  const res = await s.run({ [s.inputNames[0]]: x });
  row["model.onnx+sharp_resize"] = Array.from(res[s.outputNames[0]].data);
  sink.write(JSON.stringify(row) + "\n");
}
sink.end();
