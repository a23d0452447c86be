"""The demo's figures: matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), PNG out."""

import math

import numpy as np

COLORS = {True: "#1b7837", False: ("#c2185b", "#ef6c00", "#5e35b1")}
DPI = 110


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    figure.savefig(path, format="png")
    return path


def _run_styles(runs):
    """A color per pairing: green for the stable one, distinct warm colors for the mistaken ones."""
    styles, mistaken = {}, 0
    for run in runs:
        name = run.pairing.name
        if name not in styles:
            if run.pairing.stable:
                styles[name] = COLORS[True] if not any(s == COLORS[True] for s in styles.values()) else "#2166ac"
            else:
                styles[name] = COLORS[False][mistaken % len(COLORS[False])]
                mistaken += 1
    return styles


def training_curves(runs, metric, metric_label, path, title, starts_description):
    """Test ``metric`` (top) and test NLL (bottom) against the epoch, one column per start (standard / saturated)."""
    from matplotlib.ticker import MaxNLocator

    starts = list(dict.fromkeys(run.init for run in runs))
    styles = _run_styles(runs)
    figure = _figure(max(4.6 * len(starts) + 0.4, 7.0), 6.2)
    axes = figure.subplots(2, len(starts), squeeze=False, sharex="col")
    for column, start in enumerate(starts):
        for run in (r for r in runs if r.init == start):
            epochs = np.arange(len(run.test))
            dashes = (None, None) if run.pairing.stable else (5, 2)
            kwargs = dict(color=styles[run.pairing.name], lw=2.2 if run.pairing.stable else 1.6, dashes=dashes,
                          label=run.pairing.name)
            axes[0, column].plot(epochs, [row[metric] for row in run.test], **kwargs)
            axes[1, column].plot(epochs, [row["nll"] for row in run.test], **kwargs)
        axes[0, column].set_title(f"{starts_description.get(start, start)}", fontsize=10)
        axes[0, column].set_ylabel(f"test {metric_label}")
        axes[0, column].set_ylim(-0.02, 1.02)
        axes[1, column].set_ylabel("test NLL (same yardstick for all)")
        axes[1, column].set_yscale("log")
        axes[1, column].set_xlabel("epoch (0 = before training)")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def saturation(z, curves, path, backend):
    """Loss and |gradient| against the logit (label 1) for each pairing: the saturation the project is about."""
    figure = _figure(10.5, 4.2)
    loss_ax, grad_ax = figure.subplots(1, 2)
    floor = 1e-30
    styles = {"sigmoid + StableBinaryCE (from logits)": ("#1b7837", (None, None), 2.4),
              "sigmoid + MSE": ("#c2185b", (5, 2), 1.8),
              "sigmoid + BinaryCrossentropy (probabilities, clipped at 1e-7)": ("#ef6c00", (2, 2), 1.8)}
    for name, (loss, grad) in curves.items():
        color, dashes, width = styles.get(name, ("k", (None, None), 1.5))
        loss_ax.plot(z, loss, color=color, dashes=dashes, lw=width, label=name)
        magnitude = np.abs(grad)
        grad_ax.plot(z, np.maximum(magnitude, floor), color=color, dashes=dashes, lw=width, label=name)
        wrong_and_zero = (magnitude == 0) & (z < 0)
        if wrong_and_zero.any():
            edge = z[wrong_and_zero].max()
            grad_ax.annotate(f"exactly 0 for z < {edge:.1f}", (edge, floor), xytext=(edge + 3, 1e-25), color=color,
                             fontsize=8, arrowprops=dict(arrowstyle="->", color=color))
    loss_ax.set_xlabel("logit z (label y = 1)")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss: only the logit-space loss keeps growing", fontsize=10)
    loss_ax.legend(fontsize=7.5, loc="upper right")
    grad_ax.set_yscale("log")
    grad_ax.set_ylim(floor / 3, 10)
    grad_ax.set_xlabel("logit z (label y = 1)")
    grad_ax.set_ylabel("|d loss / d z|  (0 drawn at 1e-30)")
    grad_ax.set_title("gradient: a confidently wrong output still learns only from logits", fontsize=10)
    for ax in (loss_ax, grad_ax):
        ax.grid(alpha=0.3)
    figure.suptitle(f"Why the loss must see the logit (computed by Keras's autodiff on {backend})", fontsize=11)
    return _save(figure, path)


def winner_takes_all(image, label_names, truth, logits, softmax_model_probabilities, path, digit):
    """One example with several labels: the multilabel head's raw outputs, their sigmoid, their softmax."""
    logits = np.asarray(logits, np.float64)
    sigmoid = 1.0 / (1.0 + np.exp(-logits))
    softmax = np.exp(logits - logits.max())
    softmax /= softmax.sum()
    figure = _figure(12.5, 3.4)
    axes = figure.subplots(1, 4, width_ratios=(0.7, 1, 1, 1))
    axes[0].imshow(np.asarray(image).reshape(8, 8), cmap="gray_r")
    axes[0].set_title(f"test digit {digit}", fontsize=10)
    axes[0].set_axis_off()
    positions = np.arange(len(label_names))
    truth = np.asarray(truth) > 0.5
    panels = (
        (logits, "raw outputs (MultilabelHead logits)", None),
        (np.stack([sigmoid, softmax], axis=-1), "the same logits: sigmoid each vs softmax", 1),
        (softmax_model_probabilities, "the softmax-trained model's output", 1),
    )
    for ax, (values, title, top) in zip(axes[1:], panels):
        values = np.asarray(values, np.float64)
        if values.ndim == 2:
            ax.bar(positions - 0.2, values[:, 0], 0.4, color="#1b7837", label="sigmoid (link of MultilabelHead)")
            ax.bar(positions + 0.2, values[:, 1], 0.4, color="#ef6c00", label="softmax (sums to 1)")
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.bar(positions, values, 0.6, color=["#1b7837" if t else "#9e9e9e" for t in truth])
        if top is not None:
            ax.axhline(0.5, color="k", lw=0.8, dashes=(3, 2))
            ax.set_ylim(0, 1.15)
        else:
            ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(positions, [f"{n}{' *' if t else ''}" for n, t in zip(label_names, truth)], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle("Several labels at once: a softmax must share one unit of probability (* = true label; "
                    "dashed: threshold 0.5)", fontsize=10.5)
    return _save(figure, path)


def regression_fits(x_train, y_train, x_test, y_test, grid, fits, path, x_label, y_label):
    """The data, and per head its location line with the central 50% band of its predicted distribution."""
    figure = _figure(7.5, 4.8)
    ax = figure.subplots()
    ax.scatter(x_train, y_train, s=14, color="#9e9e9e", alpha=0.8, label="train")
    ax.scatter(x_test, y_test, s=20, facecolors="none", edgecolors="k", lw=0.8, label="test")
    for (name, location, half_width, color, summary) in fits:
        ax.plot(grid, location, color=color, lw=2.2, label=f"{name}: {summary}")
        ax.fill_between(grid, location - half_width, location + half_width, color=color, alpha=0.18)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Gaussian head: mean ± 0.674σ;  Laplace head: median ± b·ln 2  (each band: central 50%)",
                 fontsize=10)
    return _save(figure, path)


def half_width_50(scale, distribution):
    """Half the width of the central 50% interval: 0.674 sigma (Gaussian) or b ln 2 (Laplace)."""
    return scale * (0.6744897501960817 if distribution == "gaussian" else math.log(2.0))
