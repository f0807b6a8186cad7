//! Reading and writing image-classification parquet shards in the Hugging Face `datasets`
//! layout: a struct column `image {bytes: binary, path: string}`, an integer `label`, and the
//! class names in the `huggingface` schema metadata (`info.features.label.names`).

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One row of a shard: encoded image bytes and class index.
#[derive(Debug, Clone)]
pub struct Row {
    /// Encoded image (JPEG or PNG).
    pub bytes: Arc<[u8]>,
    /// Class index.
    pub label: i64,
}

/// The rows of one shard and the class names found in its metadata (empty if none).
#[derive(Debug, Clone, Default)]
pub struct Shard {
    /// Rows in file order.
    pub rows: Vec<Row>,
    /// Class names from the `huggingface` metadata.
    pub class_names: Vec<String>,
}

fn class_names_from_json(json: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("huggingface metadata: {e}"))?;
    let names = v
        .pointer("/info/features/label/names")
        .or_else(|| v.pointer("/features/label/names"))
        .and_then(|n| n.as_array());
    Ok(names
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Reads a shard. Errors name the file and the problem (not parquet, missing column, wrong type).
///
/// ```
/// use candle_finetune::data::parquet::{read_shard, write_shard};
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("train-00000-of-00001.parquet");
/// write_shard(&p, &[(b"abc".to_vec(), 1)], &["a".into(), "b".into()]).unwrap();
/// let s = read_shard(&p).unwrap();
/// assert_eq!((s.rows.len(), s.rows[0].label, s.class_names.len()), (1, 1, 2));
/// ```
pub fn read_shard(path: &Path) -> Result<Shard, String> {
    let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| ctx(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ctx(&e))?;
    let mut class_names = Vec::new();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let hf = kv
        .iter()
        .find(|k| k.key == "huggingface")
        .and_then(|k| k.value.clone())
        .or_else(|| builder.schema().metadata().get("huggingface").cloned());
    if let Some(json) = hf {
        class_names = class_names_from_json(&json).map_err(|e| ctx(&e))?;
    }
    let reader = builder.build().map_err(|e| ctx(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| ctx(&e))?;
        let image = batch
            .column_by_name("image")
            .ok_or_else(|| ctx(&"no `image` column"))?;
        let bytes_col: ArrayRef = match image.data_type() {
            DataType::Struct(_) => image
                .as_struct()
                .column_by_name("bytes")
                .cloned()
                .ok_or_else(|| ctx(&"`image` struct has no `bytes` field"))?,
            DataType::Binary | DataType::LargeBinary => image.clone(),
            other => {
                return Err(ctx(&format!(
                    "`image` column has type {other}, expected struct or binary"
                )))
            }
        };
        let label = batch
            .column_by_name("label")
            .ok_or_else(|| ctx(&"no `label` column"))?;
        let labels: Vec<Option<i64>> = match label.data_type() {
            DataType::Int64 => label.as_primitive::<Int64Type>().iter().collect(),
            DataType::Int32 => label
                .as_primitive::<Int32Type>()
                .iter()
                .map(|v| v.map(i64::from))
                .collect(),
            other => {
                return Err(ctx(&format!(
                    "`label` column has type {other}, expected an integer"
                )))
            }
        };
        for (i, label) in labels.into_iter().enumerate() {
            let bytes: &[u8] = match bytes_col.data_type() {
                DataType::Binary => {
                    let a = bytes_col.as_binary::<i32>();
                    if a.is_null(i) {
                        &[]
                    } else {
                        a.value(i)
                    }
                }
                DataType::LargeBinary => {
                    let a = bytes_col.as_binary::<i64>();
                    if a.is_null(i) {
                        &[]
                    } else {
                        a.value(i)
                    }
                }
                other => {
                    return Err(ctx(&format!(
                        "image bytes have type {other}, expected binary"
                    )))
                }
            };
            let label =
                label.ok_or_else(|| ctx(&format!("row {} has a null label", rows.len())))?;
            rows.push(Row {
                bytes: Arc::from(bytes),
                label,
            });
        }
    }
    Ok(Shard { rows, class_names })
}

/// Writes a shard in the `datasets` layout (snappy-compressed), with `class_names` as the
/// `label` ClassLabel in the `huggingface` metadata. Atomic.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("s.parquet");
/// candle_finetune::data::parquet::write_shard(&p, &[], &["only".into()]).unwrap();
/// assert!(p.exists());
/// ```
pub fn write_shard(
    path: &Path,
    rows: &[(Vec<u8>, i64)],
    class_names: &[String],
) -> Result<(), String> {
    let hf = serde_json::json!({
        "info": {"features": {
            "image": {"_type": "Image"},
            "label": {"names": class_names, "_type": "ClassLabel"}
        }}
    });
    let image_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("image", DataType::Struct(image_fields.clone()), true),
            Field::new("label", DataType::Int64, true),
        ],
        HashMap::from([("huggingface".to_string(), hf.to_string())]),
    ));
    let bytes = BinaryArray::from_iter_values(rows.iter().map(|r| r.0.as_slice()));
    let paths = StringArray::from_iter((0..rows.len()).map(|i| Some(format!("{i}.img"))));
    let image = StructArray::new(
        image_fields,
        vec![Arc::new(bytes) as ArrayRef, Arc::new(paths)],
        None,
    );
    let labels = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(image), Arc::new(labels)])
        .map_err(|e| format!("parquet {}: {e}", path.display()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    crate::files::atomic_write(path, |tmp| {
        let f = std::fs::File::create(tmp)?;
        let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props.clone()))
            .map_err(candle_core::Error::wrap)?;
        w.write(&batch).map_err(candle_core::Error::wrap)?;
        w.close().map_err(candle_core::Error::wrap)?;
        Ok(())
    })
    .map_err(|e| format!("parquet {}: {e}", path.display()))
}
