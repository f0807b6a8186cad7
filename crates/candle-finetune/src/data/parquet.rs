//! Reading and writing image-classification parquet shards in the Hugging Face `datasets`
//! layout: an image column (a struct `{bytes: binary, path: string}`, or binary), an integer
//! class column, and the features (Image, ClassLabel names) in the `huggingface` schema
//! metadata. Which columns to read: [`super::features`].

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::features::{self, Columns, Features};

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
    /// Class names (those of the [`Columns`] read with; empty if none).
    pub class_names: Vec<String>,
}

/// The columns a shard stores (by arrow type) and the features its `huggingface` metadata
/// declares, if any.
///
/// ```
/// use candle_finetune::data::parquet::{inspect, write_shard};
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("s.parquet");
/// write_shard(&p, &[(b"x".to_vec(), 0)], &["a".into()]).unwrap();
/// let (stored, declared) = inspect(&p).unwrap();
/// assert_eq!(stored.len(), 2);
/// assert!(declared.is_some());
/// ```
pub fn inspect(path: &Path) -> Result<(Features, Option<Features>), String> {
    let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| ctx(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ctx(&e))?;
    let declared = hf_metadata(&builder)
        .map(|json| features::from_hf_metadata(&json).map_err(|e| ctx(&e)))
        .transpose()?
        .flatten();
    Ok((features::from_schema(builder.schema()), declared))
}

fn hf_metadata<T>(builder: &parquet::arrow::arrow_reader::ArrowReaderBuilder<T>) -> Option<String> {
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == "huggingface").cloned())
        .and_then(|k| k.value)
        .or_else(|| builder.schema().metadata().get("huggingface").cloned())
}

fn labels_of(col: &ArrayRef) -> Option<Vec<Option<i64>>> {
    macro_rules! ints {
        ($($t:ty),*) => {
            $(if let Some(a) = col.as_primitive_opt::<$t>() {
                return Some(a.iter().map(|v| v.and_then(|v| i64::try_from(v).ok().or(Some(-1)))).collect());
            })*
        };
    }
    ints!(Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type);
    None
}

/// The encoded images of column `image_column` of a record batch: a struct's `bytes` field
/// or a binary column; a null image is empty bytes (it fails to decode, and is skipped, later).
pub(crate) fn image_bytes(
    batch: &RecordBatch,
    image_column: &str,
) -> Result<Vec<Arc<[u8]>>, String> {
    let col = batch
        .column_by_name(image_column)
        .ok_or_else(|| format!("no `{image_column}` column"))?;
    let bytes: ArrayRef = match col.data_type() {
        DataType::Struct(_) => col
            .as_struct()
            .column_by_name("bytes")
            .cloned()
            .ok_or_else(|| format!("`{image_column}` struct has no `bytes` field"))?,
        DataType::Binary | DataType::LargeBinary => col.clone(),
        other => {
            return Err(format!(
                "`{image_column}` column has type {other}, expected struct or binary"
            ))
        }
    };
    fn all<O: arrow_array::OffsetSizeTrait>(
        a: &arrow_array::GenericBinaryArray<O>,
    ) -> Vec<Arc<[u8]>> {
        (0..a.len())
            .map(|i| {
                if a.is_null(i) {
                    Arc::from(&[][..])
                } else {
                    Arc::from(a.value(i))
                }
            })
            .collect()
    }
    match bytes.data_type() {
        DataType::Binary => Ok(all(bytes.as_binary::<i32>())),
        DataType::LargeBinary => Ok(all(bytes.as_binary::<i64>())),
        other => Err(format!("image bytes have type {other}, expected binary")),
    }
}

/// Reads only the class column of a shard, every row in order (nulls are an error naming the
/// row).
///
/// ```
/// use candle_finetune::data::parquet::{read_labels, write_shard};
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("s.parquet");
/// write_shard(&p, &[(b"a".to_vec(), 1), (b"b".to_vec(), 0)], &["x".into(), "y".into()]).unwrap();
/// assert_eq!(read_labels(&p, "label").unwrap(), [1, 0]);
/// assert!(read_labels(&p, "nope").unwrap_err().contains("no `nope` column"));
/// ```
pub fn read_labels(path: &Path, label_column: &str) -> Result<Vec<i64>, String> {
    let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| ctx(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ctx(&e))?;
    let schema = builder.parquet_schema();
    let wanted: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| schema.get_column_root(i).name() == label_column)
        .collect();
    if wanted.is_empty() {
        return Err(ctx(&format!("no `{label_column}` column")));
    }
    let mask = parquet::arrow::ProjectionMask::leaves(schema, wanted);
    let reader = builder.with_projection(mask).build().map_err(|e| ctx(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| ctx(&e))?;
        let col = batch
            .column_by_name(label_column)
            .ok_or_else(|| ctx(&format!("no `{label_column}` column")))?;
        let labels = labels_of(col).ok_or_else(|| {
            ctx(&format!(
                "`{label_column}` column has type {}, expected an integer",
                col.data_type()
            ))
        })?;
        for l in labels {
            out.push(l.ok_or_else(|| ctx(&format!("row {} has a null label", out.len())))?);
        }
    }
    Ok(out)
}

/// Reads a shard's images and labels from the image and label columns of `columns` (class names
/// are not read here: see [`Columns::class_names`]). Errors name the file and the problem (not
/// parquet, missing column, wrong type, null label).
///
/// ```
/// use candle_finetune::data::features::Columns;
/// use candle_finetune::data::parquet::{read_shard, write_shard};
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("train-00000-of-00001.parquet");
/// write_shard(&p, &[(b"abc".to_vec(), 1)], &["a".into(), "b".into()]).unwrap();
/// let cols = Columns { image: "image".into(), label: "label".into(), class_names: None };
/// let s = read_shard(&p, &cols).unwrap();
/// assert_eq!((s.rows.len(), s.rows[0].label), (1, 1));
/// ```
pub fn read_shard(path: &Path, columns: &Columns) -> Result<Shard, String> {
    let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| ctx(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| ctx(&e))?;
    let class_names = columns.class_names.clone().unwrap_or_default();
    // Read only the two columns (a dataset may carry many others).
    let schema = builder.parquet_schema();
    let wanted: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| {
            let root = schema.get_column_root(i).name();
            root == columns.image || root == columns.label
        })
        .collect();
    let mask = parquet::arrow::ProjectionMask::leaves(schema, wanted);
    let reader = builder.with_projection(mask).build().map_err(|e| ctx(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| ctx(&e))?;
        let images = image_bytes(&batch, &columns.image).map_err(|e| ctx(&e))?;
        let label = batch
            .column_by_name(&columns.label)
            .ok_or_else(|| ctx(&format!("no `{}` column", columns.label)))?;
        let labels = labels_of(label).ok_or_else(|| {
            ctx(&format!(
                "`{}` column has type {}, expected an integer",
                columns.label,
                label.data_type()
            ))
        })?;
        for (bytes, label) in images.into_iter().zip(labels) {
            let label =
                label.ok_or_else(|| ctx(&format!("row {} has a null label", rows.len())))?;
            rows.push(Row { bytes, label });
        }
    }
    Ok(Shard { rows, class_names })
}

/// How [`write_shard_with`] lays a shard out, as the `datasets` library would write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// The image column (a struct `{bytes, path}`, declared an `Image` feature).
    pub image_column: String,
    /// The class column (int64, declared a `ClassLabel` with the class names).
    pub label_column: String,
    /// An extra plain int64 column (declared a `Value`), holding `label / 5` (as CIFAR-100's
    /// coarse label groups five fine classes): a second integer beside the class.
    pub extra_integer_column: Option<String>,
    /// Rows per row group (0: one group).
    pub rows_per_group: usize,
}

impl Default for ShardLayout {
    /// `image` and `label`, no extra column, one row group.
    fn default() -> Self {
        Self {
            image_column: "image".into(),
            label_column: "label".into(),
            extra_integer_column: None,
            rows_per_group: 0,
        }
    }
}

/// Writes a shard in the `datasets` layout (snappy-compressed): `image {bytes, path}` and
/// `label`, with `class_names` as the `label` ClassLabel in the `huggingface` metadata. Atomic.
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
    write_shard_with(path, rows, class_names, &ShardLayout::default())
}

/// [`write_shard`] with other column names, an extra integer column and row groups.
///
/// ```
/// use candle_finetune::data::parquet::{inspect, write_shard_with, ShardLayout};
/// use candle_finetune::data::features::Feature;
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("s.parquet");
/// let layout = ShardLayout { image_column: "img".into(), label_column: "fine_label".into(),
///     extra_integer_column: Some("coarse_label".into()), rows_per_group: 1 };
/// write_shard_with(&p, &[(b"x".to_vec(), 3), (b"y".to_vec(), 7)], &(0..10).map(|i| i.to_string()).collect::<Vec<_>>(), &layout).unwrap();
/// let (stored, declared) = inspect(&p).unwrap();
/// assert_eq!(stored.len(), 3);
/// assert!(declared.unwrap().contains(&("coarse_label".to_string(), Feature::Integer)));
/// ```
pub fn write_shard_with(
    path: &Path,
    rows: &[(Vec<u8>, i64)],
    class_names: &[String],
    layout: &ShardLayout,
) -> Result<(), String> {
    let mut features = serde_json::Map::new();
    features.insert(
        layout.image_column.clone(),
        serde_json::json!({"_type": "Image"}),
    );
    features.insert(
        layout.label_column.clone(),
        serde_json::json!({"names": class_names, "_type": "ClassLabel"}),
    );
    if let Some(x) = &layout.extra_integer_column {
        features.insert(
            x.clone(),
            serde_json::json!({"dtype": "int64", "_type": "Value"}),
        );
    }
    let hf = serde_json::json!({ "info": { "features": features } });
    let image_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let mut fields = vec![
        Field::new(
            &layout.image_column,
            DataType::Struct(image_fields.clone()),
            true,
        ),
        Field::new(&layout.label_column, DataType::Int64, true),
    ];
    if let Some(x) = &layout.extra_integer_column {
        fields.push(Field::new(x, DataType::Int64, true));
    }
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
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
    let mut columns: Vec<ArrayRef> = vec![Arc::new(image), Arc::new(labels)];
    if layout.extra_integer_column.is_some() {
        columns.push(Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.1 / 5),
        )));
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| format!("parquet {}: {e}", path.display()))?;
    let mut props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY);
    if layout.rows_per_group > 0 {
        props = props.set_max_row_group_size(layout.rows_per_group);
    }
    let props = props.build();
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
