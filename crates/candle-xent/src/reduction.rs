//! How per-element losses are combined into the returned tensor.

/// Reduction applied to the per-element losses, as PyTorch's `reduction=` argument.
///
/// ```
/// use candle_xent::Reduction;
/// assert_eq!(Reduction::default(), Reduction::Mean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// One loss per target element: shape `(N, d1, .., dk)`, or a scalar for an unbatched input.
    None,
    /// The sum of the per-element losses.
    Sum,
    /// For class-index targets, the sum divided by the total weight of the non-ignored targets
    /// (their count when unweighted; NaN when every target is ignored). For probability targets,
    /// the sum divided by the number of elements `N * d1 * .. * dk`.
    #[default]
    Mean,
}
