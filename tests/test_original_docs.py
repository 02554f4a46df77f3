"""Every code example of the original ``iunets`` documentation, run with only the import changed.

Source: the ``docs/`` folder of the reference repository (GitHub ``cetmann/iunets``: tutorials
1-5, ``training_iunets.rst``, ``invertible_layers.rst``, ``invertible_downsampling.rst``,
``invertible_channel_mixing.rst``, ``padding.rst``), in the versions stored for it (the older
``in_channels=`` API and the newer ``channels=`` API where they differ), and its README
(iunets master and 0.1).  The snippets are the users' code: copied as written, with
``iunets`` -> ``iunet_nb``; every other change is named in a comment:

* ``.to('cuda')`` -> ``.to(DEVICE)`` (CPU here) and smaller inputs / fewer steps where the
  docs use GPU-sized ones (a batch of 4 x 32 x 128^3 voxels, 50 CIFAR-10 epochs);
* the CIFAR-10 download (torchvision, internet) -> random images of the same shape;
* **errors in the docs themselves** (they fail with the original package too) are tested in
  their corrected intent:

  - tutorial 3: ``downsampling.inverse(downsampled)`` uses an undefined name (the example
    turned ``output`` into a numpy array); here ``downsampled = downsampling(torch_img)``;
  - tutorial 5 (older version): misplaced parentheses in a ``print`` (a SyntaxError);
  - tutorial 1 (older version): ``output_layer = nn.Conv3d(INPUT_CHANNELS, INTERMEDIATE_CHANNELS)``
    after an iUNet with 64 channels fails in the first forward; the newer version's
    ``nn.Conv3d(INTERMEDIATE_CHANNELS, OUTPUT_CHANNELS)`` is tested;
  - tutorial 2: ``LR is 'R'`` / ``branch is 'decoder'`` compare strings by identity (a
    SyntaxWarning since Python 3.8); ``==`` here.

Printed outputs are compared with the docs' outputs; where this package deliberately differs
(the "Average relative error" of the iunets master README, see tests/test_model.py) the comment says so.
The README examples themselves (the layouts of the iunets master and 0.1 READMEs) are checked verbatim in
tests/test_model.py (``test_*_readme_*_as_written``); here they are also run as a network.
"""
from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

import iunet_nb  # noqa: E402
from iunet_nb import iUNet  # noqa: E402
from iunet_nb.layers import AdditiveCoupling, create_standard_module  # noqa: E402

torch.set_num_threads(1)
DEVICE = "cpu"  # the docs use 'cuda'


@pytest.fixture(autouse=True)
def _seed_and_close_figures():
    torch.manual_seed(0)
    yield
    plt.close("all")


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.mse_loss(a, b).item()


# =============================================================== README (iunets master and 0.1)
def test_readme_models_run_as_networks():
    """"This model can now be integrated into the normal Pytorch workflow": the README's four
    models (layouts checked in tests/test_model.py) train one step and invert."""
    with pytest.warns(UserWarning, match="slice_mode"):  # the iunets master README passes slice_mode with channels=
        models = [
            iUNet(channels=(64,128,256,384), architecture=(2,2,2,2), dim=2),
            iUNet(in_channels=64, architecture=[2,2,2,2], dim=2),
            iUNet(channels=(7,15,35,91), dim=3, architecture=(2,3,1,3),
                  create_module_fn=create_standard_module, module_kwargs={'depth': 3},
                  slice_mode='double', resampling_stride=[2,2,(1,2,2)], learnable_resampling=True,
                  resampling_init='haar', resampling_method='cayley', disable_custom_gradient=False,
                  revert_input_padding=True, padding_mode='reflect', verbose=0),
            iUNet(in_channels=7, dim=3, architecture=[2,3,1,3],
                  create_module_fn=create_standard_module, module_kwargs={'block_depth': 3},
                  slice_mode='double', resampling_stride=2, learnable_resampling=True,
                  resampling_init='haar', resampling_method='cayley', disable_custom_gradient=False,
                  revert_input_padding=True, padding_mode='reflect', verbose=0),
        ]
    for model, size in zip(models, [(16, 16), (16, 16), (5, 9, 7), (8, 8, 8)]):
        x = torch.randn(1, model.channels[0], *size)
        y = model(x)
        assert y.shape == x.shape
        y.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        with torch.no_grad():
            assert (model.inverse(model(x)) - x).abs().max().item() < 1e-4


# =============================================================== tutorial 1: training
TUTORIAL1_LAYOUT = """\
3-3-3-3-(1/2)----------------------------------------------------------------------------------------------------(1/2)-3-3-3-3
----------8-8-8-8-(4/4)-------------------------------------------------------------------------------(4/4)-8-8-8-8-----------
---------------------16-16-16-16-(8/8)--------------------------------------------------(8/8)-16-16-16-16---------------------
-----------------------------------32-32-32-32-(16/16)-----------------(16/16)-32-32-32-32------------------------------------
---------------------------------------------------64-64-64-64--64-64-64-64---------------------------------------------------
"""


@pytest.mark.slow
def test_tutorial1_training_loop(capsys):
    # "Load CIFAR10 dataset": no downloads here; random images of CIFAR-10's shape instead.
    images = torch.rand(16, 3, 32, 32)
    data = torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long))
    data_loader = torch.utils.data.DataLoader(
        data,
        batch_size=8,  # 128 in the docs
        shuffle=True
    )

    model = iUNet(
        in_channels=3,
        dim=2,
        architecture=(4,4,4,4,4)
    ).to(DEVICE)

    model.print_layout()
    assert capsys.readouterr().out == TUTORIAL1_LAYOUT

    optimizer = torch.optim.Adam(model.parameters(), lr=0.0001)
    loss_curve = []
    loss_fn = torch.nn.MSELoss()

    for epoch in range(3):  # 50 in the docs
        for id, (x, _) in enumerate(data_loader):
            x = x.to(DEVICE)
            y = torch.flip(x, (3,))
            optimizer.zero_grad()
            output = model(x)

            loss = loss_fn(output, y)
            loss.backward()
            loss_curve.append(loss.cpu().detach().numpy())
            optimizer.step()

    plt.plot(loss_curve)
    plt.xlabel("Training steps")
    plt.ylabel("Loss")

    assert len(loss_curve) == 6
    assert all(np.isfinite(v) for v in loss_curve)
    # the model starts as the identity; learning to mirror lowers the loss
    assert loss_curve[-1] < loss_curve[0]


def test_tutorial1_segmentation_model():
    INPUT_CHANNELS = 3
    INTERMEDIATE_CHANNELS = 64
    OUTPUT_CHANNELS = 10

    input_layer = nn.Conv3d(
        INPUT_CHANNELS,
        INTERMEDIATE_CHANNELS,
        kernel_size=3,
        padding=1
    )

    iunet = iUNet(
        in_channels=INTERMEDIATE_CHANNELS,
        dim=3,
        architecture=(2,3,4)
    )

    # The older version of the docs had nn.Conv3d(INPUT_CHANNELS, INTERMEDIATE_CHANNELS, ...)
    # here, which fails on the iUNet's 64 channels (in the original too).
    output_layer = nn.Conv3d(
        INTERMEDIATE_CHANNELS,
        OUTPUT_CHANNELS,
        kernel_size=3,
        padding=1
    )

    # Chain all sub-networks together
    model = nn.Sequential(input_layer, iunet, output_layer).to(DEVICE)

    assert iunet.channels == (64, 128, 256)
    x = torch.randn(1, 3, 8, 8, 8)
    out = model(x)
    assert out.shape == (1, 10, 8, 8, 8)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# =============================================================== tutorial 2: invertible layers
def my_module_fn(in_channels, **kwargs):
    channel_split_pos = in_channels//2

    conv_layer = nn.Conv3d(in_channels = channel_split_pos,
                           out_channels = in_channels - channel_split_pos,
                           kernel_size = 3,
                           padding = 1)
    nonlinearity = nn.ReLU()
    F = nn.Sequential(conv_layer, nonlinearity)

    return AdditiveCoupling(F, channel_split_pos)


def test_tutorial2_custom_additive_coupling(capsys):
    # Create a batch of random data (4 x 32 x 128^3 on a GPU in the docs)
    x = torch.randn(1, 32, 16, 16, 16).to(DEVICE)

    # Create an instance of the above invertible layer
    invertible_layer = my_module_fn(32).to(DEVICE)

    # Compute the output of the layer and reconstruct its input
    y = invertible_layer(x)
    x_reconstructed = invertible_layer.inverse(y)

    # Check the quality of reconstruction
    print("MSE: {}".format(nn.functional.mse_loss(x, x_reconstructed).item()))

    out = capsys.readouterr().out
    assert out.startswith("MSE: ")
    assert float(out[5:]) < 1e-12  # docs: 2.5294868141494326e-16
    # (x1, x2) -> (x2, x1 + F(x2)) with x1 = x[:, :16]
    assert torch.equal(y[:, :16], x[:, 16:])
    torch.testing.assert_close(y[:, 16:], x[:, :16] + invertible_layer.F(x[:, 16:]))


@pytest.mark.parametrize("api", ["in_channels", "channels"])
def test_tutorial2_custom_module_in_an_iunet(api, capsys):
    x = torch.randn(1, 32, 16, 16, 16).to(DEVICE)
    # Create a iUNet with create_module_fn = my_module_fn
    if api == "in_channels":  # older version of the docs
        model = iunet_nb.iUNet(
            in_channels = 32,
            dim = 3,
            architecture = (2,3,4),
            create_module_fn = my_module_fn
        ).to(DEVICE)
    else:
        model = iunet_nb.iUNet(
            channels = (32,64,128),
            dim = 3,
            architecture = (2,3,4),
            create_module_fn = my_module_fn
        )
        model = model.to(DEVICE)

    # Compute the output of the iUNet and reconstruct its input
    y = model(x)
    x_reconstructed = model.inverse(y)

    # Check the quality of reconstruction
    print("MSE: {}".format(nn.functional.mse_loss(x, x_reconstructed).item()))

    out = capsys.readouterr().out
    assert out.startswith("MSE: ")
    assert float(out[5:]) < 1e-10  # docs: 3.4675983872495264e-13
    assert model.channels == (32, 64, 128)
    couplings = [m for m in model.modules() if isinstance(m, AdditiveCoupling)]
    assert len(couplings) == 2 * (2 + 3 + 4)


def my_customizable_module_fn(in_channels, **kwargs):
    channel_split_pos = in_channels//2
    conv_layer = nn.Conv3d(in_channels = channel_split_pos,
                           out_channels = in_channels - channel_split_pos,
                           kernel_size = 3,
                           padding = 1)
    nonlinearity_str = kwargs.get('nonlinearity', 'ReLU')
    nonlinearity = getattr(nn, nonlinearity_str)()
    F = nn.Sequential(conv_layer, nonlinearity)
    return AdditiveCoupling(F, channel_split_pos)


@pytest.mark.parametrize("api", ["positional", "channels"])
def test_tutorial2_module_kwargs(api):
    if api == "positional":  # older version: iUNet(32, ...) is in_channels=32
        model = iunet_nb.iUNet(
            32,
            dim = 3,
            architecture = (2,3,4),
            create_module_fn = my_customizable_module_fn,
            module_kwargs = {'nonlinearity': 'LeakyReLU'}
        ).to(DEVICE)
    else:
        model = iunet_nb.iUNet(
            channels=(32,64,128),
            dim = 3,
            architecture = (2,3,4),
            create_module_fn = my_customizable_module_fn,
            module_kwargs = {'nonlinearity': 'LeakyReLU'}
        )
        model = model.to(DEVICE)
    assert model.channels == (32, 64, 128)
    couplings = [m for m in model.modules() if isinstance(m, AdditiveCoupling)]
    assert len(couplings) == 2 * (2 + 3 + 4)
    assert all(isinstance(c.F[1], nn.LeakyReLU) for c in couplings)


@pytest.mark.parametrize("block_depth", [1, 3])
def test_tutorial2_standard_module_keywords(block_depth):
    # "passable keywords are block_depth (the number of Conv-LReLU-Normalization blocks) and
    # zero_init (... initializes the whole additive coupling layer as the identity, up to the
    # reordering of channels)"
    layer = create_standard_module(6, dim=2, block_depth=block_depth, zero_init=True)
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == block_depth
    x = torch.randn(2, 6, 5, 5)
    y = layer(x)
    assert torch.equal(y, torch.cat([x[:, 3:], x[:, :3]], dim=1))
    layer = create_standard_module(6, dim=2, block_depth=block_depth, zero_init=False)
    assert not torch.equal(layer(x), torch.cat([x[:, 3:], x[:, :3]], dim=1))


def _fine_grained_module_fn(coordinate: str, last: str):
    """The docs' ``my_fine_grained_module_fn``; ``coordinate`` is 'LR' (older version, value
    'R') or 'branch' (newer version, value 'decoder')."""

    def my_fine_grained_module_fn(in_channels, **kwargs):
        channel_split_pos = in_channels//2

        # Coordinates of the current module
        LR = kwargs.get(coordinate)
        level = kwargs.get('level')
        module_index = kwargs.get('module_index')

        # architecure keyword passed to the iUNet
        architecture = kwargs.get('architecture')

        # Dimensionality of the data, for choosing the right convolution
        dim = kwargs.get('dim')

        conv_op = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim-1]
        conv_layer = conv_op(in_channels = channel_split_pos,
                             out_channels = in_channels - channel_split_pos,
                             kernel_size = 3,
                             padding = 1)

        nonlinearity = nn.ReLU()
        layers = [conv_layer, nonlinearity]

        # In the very last layer, apply an instance normalization layer
        if (LR == last and  # `is` in the docs
            level==0 and
            module_index==architecture[0]-1):
            print(
                "Adding instance normalization in coordinate ({},{},{}).".format(
                    LR, level, module_index
                )
            )

            norm_op = [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d][dim-1]
            layers.append(norm_op(channel_split_pos))

        F = nn.Sequential(*layers)
        return AdditiveCoupling(F, channel_split_pos)

    return my_fine_grained_module_fn


@pytest.mark.parametrize("coordinate, last, api", [("LR", "R", "positional"),
                                                   ("branch", "decoder", "channels")])
def test_tutorial2_layerwise_definition(coordinate, last, api, capsys):
    my_fine_grained_module_fn = _fine_grained_module_fn(coordinate, last)
    if api == "positional":
        model = iunet_nb.iUNet(
            32,
            dim = 3,
            architecture = [3,4,5],
            create_module_fn = my_fine_grained_module_fn
        ).to(DEVICE)
    else:
        model = iunet_nb.iUNet(
            channels=(32,64,128),
            dim = 3,
            architecture = [3,4,5],
            create_module_fn = my_fine_grained_module_fn
        )
        model = model.to(DEVICE)

    # docs (newer version): "Adding instance normalization in coordinate (decoder,0,2)."
    assert capsys.readouterr().out == f"Adding instance normalization in coordinate ({last},0,2).\n"
    couplings = [m for m in model.decoder_modules[0] if isinstance(m, AdditiveCoupling)]
    assert len(couplings) == 3
    assert isinstance(couplings[-1].F[-1], nn.InstanceNorm3d)
    everywhere = [m for m in model.modules() if isinstance(m, AdditiveCoupling)]
    assert len(everywhere) == 2 * (3 + 4 + 5)
    assert sum(isinstance(c.F[-1], nn.InstanceNorm3d) for c in everywhere) == 1
    x = torch.randn(1, 32, 8, 8, 8)
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-4


# =============================================================== tutorial 3: up- and downsampling
def test_tutorial3_introductory_example(capsys):
    from skimage import data

    from iunet_nb.layers import InvertibleDownsampling2D

    # Load example image
    img = np.array(data.camera(), dtype=np.float32) / 255.

    # Display input image
    plt.figure(figsize=(7,7),constrained_layout=True)
    plt.imshow(img, cmap='Greys_r')

    # Helper functions to transfer between Numpy and Pytorch
    to_torch = lambda img: torch.Tensor(np.expand_dims(img, (0,1)))  # noqa: E731
    to_numpy = lambda img: img.detach().numpy()  # noqa: E731

    # Transfer to Torch, reshape to batch of shape (1, 1, 512, 512)
    torch_img = to_torch(img)

    # Create learnable invertible downsampling layer
    downsampling = InvertibleDownsampling2D(
        in_channels=1,
        stride=(2,2)
    )

    # Compute downsampled images
    output = downsampling(torch_img)
    output = to_numpy(output)

    # Display output images
    fig = plt.figure(figsize=(7,7),constrained_layout=True)
    ax_array = fig.subplots(2, 2, squeeze=False)
    ax_array[0, 0].imshow(output[0,0], cmap='Greys_r')
    ax_array[0, 1].imshow(output[0,1], cmap='Greys_r')
    ax_array[1, 0].imshow(output[0,2], cmap='Greys_r')
    ax_array[1, 1].imshow(output[0,3], cmap='Greys_r')

    assert torch_img.shape == (1, 1, 512, 512)
    assert output.shape == (1, 4, 256, 256)
    # "By default, this is initialized as the Haar transform": the four sub-bands, in the
    # reference's order for 2D and Cayley (checked against iunets in tests/test_reference_oracle.py)
    a, b = img[0::2, 0::2], img[0::2, 1::2]
    c, d = img[1::2, 0::2], img[1::2, 1::2]
    for k, band in enumerate([a + b - c - d, a + b + c + d, a - b + c - d, a - b - c + d]):
        np.testing.assert_allclose(output[0, k], band / 2, rtol=0, atol=1e-6)

    # We now check how well the inversion works.  The docs call
    # downsampling.inverse(downsampled) with `downsampled` never defined (a NameError in the
    # original too; `output` was turned into a numpy array above): the intent is the tensor.
    downsampled = downsampling(torch_img)
    img_reconstruction = downsampling.inverse(downsampled)
    print("MSE: {}".format(torch.nn.functional.mse_loss(torch_img, img_reconstruction).item()))

    out = capsys.readouterr().out
    assert out.startswith("MSE: ") and float(out[5:]) < 1e-12  # docs: 1.0410113272302972e-15


TUTORIAL3_LAYOUT = """\
32-32-(24/8)----------------------------------------------------(24/8)-32-32
---------64-64-(48/16)--------------------------------(48/16)-64-64---------
------------------128-128-(96/32)---------(96/32)-128-128-------------------
------------------------------256-256--256-256------------------------------
"""


def test_tutorial3_resampling_in_iunets(capsys):
    model = iUNet(
        channels=(32,64,128,256),
        dim=3,
        architecture=(2,2,2,2),
        resampling_stride=2,
        resampling_method='exp',
        resampling_init='haar',
        resampling_kwargs={}
    )
    model.print_layout()
    assert capsys.readouterr().out == TUTORIAL3_LAYOUT
    assert all(d.method == "exp" and d.init == "haar" for d in model.downsampling_layers)


def _user_matrix(s: int, kind: str):
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((s, s)))[0]
    return q if kind == "ndarray" else torch.from_numpy(q)


@pytest.mark.parametrize("init", ["haar", "squeeze", "random", "tensor", "ndarray"])
@pytest.mark.parametrize("method", ["cayley", "exp", "householder"])
def test_tutorial3_resampling_options(init, method):
    # "resampling_init ... Current options are "haar", "squeeze", "random" or a user-specified
    # torch.Tensor or numpy.ndarray"; "resampling_method ... "exp", "cayley" and "householder""
    resampling_init = _user_matrix(4, init) if init in ("tensor", "ndarray") else init
    model = iUNet(channels=(4, 8, 16), dim=2, architecture=(1, 1, 1), resampling_stride=2,
                  resampling_method=method, resampling_init=resampling_init, verbose=0)
    down = model.downsampling_layers[0]
    if init in ("tensor", "ndarray"):
        torch.testing.assert_close(down.base[0], torch.as_tensor(_user_matrix(4, "tensor")).float())
    elif init == "squeeze":  # pixel shuffle: the identity kernel
        assert torch.equal(down.base[0], torch.eye(4))
    x = torch.randn(2, 4, 8, 8)
    y = model(x)
    y.sum().backward()
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-5


@pytest.mark.parametrize("resampling_stride, architecture, strides, factors", [
    (2, (1, 1, 1), [(2, 2, 2)] * 2, (4, 4, 4)),
    ((2,1,3), (1, 1, 1), [(2, 1, 3)] * 2, (4, 1, 9)),
    ([(2,1,3), 2, (4,3,1)], (1, 1, 1, 1), [(2, 1, 3), (2, 2, 2), (4, 3, 1)], (16, 6, 6)),
])
def test_tutorial3_anisotropic_strides(resampling_stride, architecture, strides, factors):
    # "the length of the list has to be equal to the number of downsampling operations ...
    # this (resolution-specific) setting requires len(architecture)==4"
    model = iUNet(in_channels=4, dim=3, architecture=architecture,
                  resampling_stride=resampling_stride, verbose=0)
    assert model.resampling_stride == strides
    assert model.downsampling_factors == factors
    assert [d.init for d in model.downsampling_layers] == ["haar"] * len(strides)  # any stride
    x = torch.randn(1, 4, *factors)
    with torch.no_grad():
        assert model(x).shape == x.shape
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-5


TUTORIAL3_CHANNELS_LAYOUT = """\
3-3-(1/2)-----------------------------------------------------------------(1/2)-3-3
------12-12-(8/4)------------------------------------------------(8/4)-12-12-------
---------------32-32-(26/6)-----------------------------(26/6)-32-32---------------
------------------------60-60-(44/16)---------(44/16)-60-60------------------------
---------------------------------128-128--128-128----------------------------------
"""


def test_tutorial3_channel_multipliers_and_closest_channels(capsys):
    model = iUNet(
        channels=(3,25,32,55,128),
        dim=3,
        architecture=(2,2,2,2,2),
        resampling_stride=[(1,2,3),(2,2,2),(5,1,2),2]
    )
    model.print_layout()

    print("Channel multipliers: {}".format(model.channel_multipliers))
    print("Downsampling factors: {}".format(model.downsampling_factors))

    out = capsys.readouterr().out
    message, rest = out.split("\n3-3-(1/2)", 1)
    # docs: "... Instead using closest achievable configuration: channels=(3, 12, 32, 60, 128).
    # Average relative error: 0.1527" (the older docs print the channels as a list); lines
    # wrap differently, and here the per-level errors and the clamped level follow.
    flat = " ".join(message.split())
    assert flat.startswith(
        "Could not exactly create an iUNet with channels=(3, 25, 32, 55, 128) and "
        "resampling_stride=[(1, 2, 3), (2, 2, 2), (5, 1, 2), (2, 2, 2)]. Instead using closest "
        "achievable configuration: channels=(3, 12, 32, 60, 128). Average relative error: 0.1527")
    assert "Level 0 must send at most 2 of its 3 channels" in flat
    assert "3-3-(1/2)" + rest == (TUTORIAL3_CHANNELS_LAYOUT
                                  + "Channel multipliers: [6, 8, 10, 8]\n"
                                  + "Downsampling factors: (20, 8, 24)\n")
    x = torch.randn(1, 3, 20, 8, 24)
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-5


# =============================================================== tutorial 4: channel mixing
def test_tutorial4_channel_mixing(capsys):
    from skimage import data

    from iunet_nb.layers import InvertibleChannelMixing2D

    # Load example image
    img = np.array(data.coffee(), dtype=np.float32) / 255.

    # Helper functions to transfer between Numpy and Pytorch
    to_torch_rgb = lambda img: torch.Tensor(np.expand_dims(np.transpose(img,(2,0,1)), 0))  # noqa: E731
    to_numpy_rgb = lambda img: np.transpose(img.detach().numpy(), (0,2,3,1))  # noqa: E731

    # Transfer to Torch, reshape to batch of shape (1, 1, 512, 512)
    torch_img = to_torch_rgb(img)

    # Create learnable invertible downsampling layer
    channel_mixing = InvertibleChannelMixing2D(
        in_channels=3
    )

    # Create random weights
    channel_mixing.weight.data = torch.randn(3, 3)

    mixed = channel_mixing(torch_img)
    mixed_np = to_numpy_rgb(mixed)

    fig = plt.figure(figsize=(12,7),constrained_layout=True)
    ax_array = fig.subplots(1, 2, squeeze=False)
    ax_array[0, 0].imshow(img)
    with warnings.catch_warnings():  # mixed colours leave [0, 1]: matplotlib clips them
        warnings.simplefilter("ignore")
        ax_array[0, 1].imshow(mixed_np[0])

    img_reconstruction = channel_mixing.inverse(mixed)
    print("MSE: {}".format(
        torch.nn.functional.mse_loss(torch_img, img_reconstruction).item())
    )

    out = capsys.readouterr().out
    assert out.startswith("MSE: ") and float(out[5:]) < 1e-12  # docs: 6.993812132075408e-15
    assert mixed_np.shape == (1, 400, 600, 3)
    # the mixing is an orthogonal 3 x 3 matrix over the colour channels (not the identity now)
    Q = channel_mixing.kernel().detach()
    torch.testing.assert_close(Q @ Q.T, torch.eye(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed, torch.einsum("ij,njhw->nihw", Q, torch_img), rtol=0, atol=1e-5)
    assert (Q - torch.eye(3)).abs().max() > 0.1


def test_tutorial4_fresh_channel_mixing_is_the_identity():
    from iunet_nb.layers import InvertibleChannelMixing1D, InvertibleChannelMixing3D

    x = torch.randn(2, 5, 7)
    assert torch.equal(InvertibleChannelMixing1D(in_channels=5)(x), x)
    m = InvertibleChannelMixing3D(4, method="exp", learnable=False)
    assert m.weight is None and torch.equal(m(torch.ones(1, 4, 2, 2, 2)), torch.ones(1, 4, 2, 2, 2))


@pytest.mark.parametrize("freq, per_level", [(-1, [2, 2, 0]), (2, [2, 2, 0]), (0, [0, 0, 0])])
@pytest.mark.parametrize("method", ["cayley", "exp", "householder"])
def test_tutorial4_channel_mixing_in_iunets(freq, per_level, method):
    # channel_mixing_freq=-1: before splitting and after re-concatenation (non-bottom levels);
    # 2: after every second coupling layer; 0: none.  architecture (2, 3, 1): with freq=2 one
    # mixing per side at levels 0 and 1, none at the bottom (one coupling).
    model = iUNet(channels=(4, 8, 16), dim=2, architecture=(2, 3, 1), channel_mixing_freq=freq,
                  channel_mixing_method=method, channel_mixing_kwargs={}, verbose=0)
    counts = [sum(isinstance(m, iunet_nb.OrthogonalChannelMixing) for m in
                  list(model.encoder_modules[i]) + list(model.decoder_modules[i]))
              for i in range(3)]
    assert counts == per_level
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-5


# =============================================================== tutorial 5: padding
@pytest.mark.parametrize("version", ["older", "newer"])
def test_tutorial5_padding(version, capsys):
    if version == "older":
        model = iUNet(
            in_channels=32,
            architecture=[2,2,2,2],
            dim=2,
            resampling_stride=[2, (3,2), (5,3)],
            revert_input_padding=False,
            verbose=0,
        )
    else:
        model = iUNet(
            channels=(32,64,128,256),
            architecture=(2,2,2,2),
            dim=2,
            resampling_stride=[2, (3,2), (5,3)],
            revert_input_padding=False,
            verbose=0,
        )
    x = torch.randn(2, 32, 128, 128)
    y = model(x)

    print("Input batch shape: {}".format(tuple(x.shape)))
    print("resampling_stride={} results in total downsampling factors per "
        "spatial dimension of {}".format(
            model.resampling_stride, model.downsampling_factors
        ))
    print("Trying to pad to resolution {}...".format(model.get_padding(x)[0]))
    # the older version misplaced two parentheses here (a SyntaxError)
    print("Now the minimal feature resolution in the network will be {}".format(
        tuple(model.encode(x, use_padding=True)[-1].shape[-2:])))
    print("Padded output shape: {}".format(tuple(y.shape)))

    print("Setting revert_input_padding to False (standard behavior)...")
    model.revert_input_padding = True
    y = model(x)
    print("Now cropped output shape: {}".format(tuple(y.shape)))

    # The docs' output, except that their "Setting revert_input_padding to True" does not
    # match the string the code prints ("False").
    assert capsys.readouterr().out == (
        "Input batch shape: (2, 32, 128, 128)\n"
        "resampling_stride=[(2, 2), (3, 2), (5, 3)] results in total downsampling factors per "
        "spatial dimension of (30, 12)\n"
        "Trying to pad to resolution [150, 132]...\n"
        "Now the minimal feature resolution in the network will be (5, 11)\n"
        "Padded output shape: (2, 32, 150, 132)\n"
        "Setting revert_input_padding to False (standard behavior)...\n"
        "Now cropped output shape: (2, 32, 128, 128)\n"
    )


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_tutorial5_padding_options(padding_mode):
    # "the user can set its padding_mode and padding_value parameters in the iUNet constructor,
    # e.g. padding_mode="reflect""
    model = iUNet(channels=(4, 8), architecture=(1, 1), dim=2, padding_mode=padding_mode,
                  padding_value=0.5, verbose=0)
    x = torch.randn(1, 4, 7, 9)
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape
        assert (model.inverse(y) - x).abs().max().item() < 1e-5
    assert model.get_padding(x)[0] == [8, 10]
    assert math.prod(model.downsampling_factors) == 4


# =============================================================== the iunets.layers API by name
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_layer_names_keywords_and_inverse(dim):
    import iunet_nb.layers as layers

    Down = getattr(layers, f"InvertibleDownsampling{dim}D")
    Up = getattr(layers, f"InvertibleUpsampling{dim}D")
    Mix = getattr(layers, f"InvertibleChannelMixing{dim}D")
    stride = {1: 3, 2: (2, 3), 3: (1, 2, 3)}[dim]
    s = 3 * (dim > 1 and 2 or 1)
    # the reference's positional order: in_channels, stride, method, init, learnable
    down = Down(2, stride, "exp", "haar", True)
    up = Up(in_channels=2 * s, stride=stride, method="householder", init="squeeze", learnable=False)
    mix = Mix(in_channels=2 * s, method="exp", learnable=True)
    assert (down.in_channels, down.out_channels, down.dim) == (2, 2 * s, dim)
    assert (up.in_channels, up.out_channels, up.dim) == (2 * s, 2, dim)
    assert (mix.in_channels, mix.out_channels, mix.dim) == (2 * s, 2 * s, dim)
    assert down.stride == ((stride,) if dim == 1 else stride)
    x = torch.randn(2, 2, *([6] * dim), dtype=torch.float32)
    y = down(x)
    assert y.shape == (2, 2 * s, *(6 // st for st in down.stride))
    torch.testing.assert_close(down.inverse(y), x, rtol=0, atol=1e-5)
    assert up(y).shape == x.shape and up.inverse(up(y)).shape == y.shape
    with torch.no_grad():
        mix.weight.normal_()
    torch.testing.assert_close(mix.inverse(mix(y)), y, rtol=0, atol=1e-5)
    assert isinstance(down, iunet_nb.InvertibleDownsampling)
    assert isinstance(mix, iunet_nb.OrthogonalChannelMixing)


def test_layer_split_and_concatenate():
    from iunet_nb.layers import ConcatenateChannels, SplitChannels

    x = torch.randn(2, 5, 4)
    a, b = SplitChannels(2)(x)
    assert torch.equal(a, x[:, :2]) and torch.equal(b, x[:, 2:])
    assert a.data_ptr() != x.data_ptr()  # copies, as in the reference
    assert torch.equal(SplitChannels(2).inverse(a, b), x)
    cat = ConcatenateChannels(2)
    assert torch.equal(cat(a, b), x)
    a2, b2 = cat.inverse(x)
    assert torch.equal(a2, a) and torch.equal(b2, b)


def test_layer_errors_are_clear():
    from iunet_nb.layers import (
        InvertibleChannelMixing2D,
        InvertibleDownsampling1D,
        InvertibleUpsampling2D,
        SplitChannels,
    )

    with pytest.raises(TypeError, match="1D: it takes no dim argument"):
        InvertibleDownsampling1D(2, dim=2)
    with pytest.raises(TypeError, match="n_reflections"):  # the reference silently ignored it
        InvertibleDownsampling1D(2, n_reflections=2)
    with pytest.raises(ValueError, match="not divisible by prod\\(stride\\)=4"):
        InvertibleUpsampling2D(6)
    with pytest.raises(ValueError, match="unknown init 'identity'"):
        InvertibleDownsampling1D(2, init="identity")
    with pytest.raises(ValueError, match="valid inits are 'identity', 'random'"):
        InvertibleChannelMixing2D(3, init="haar")
    with pytest.raises(ValueError, match="split_location must be a positive int"):
        SplitChannels(0)
    with pytest.raises(TypeError, match="pass channels=C"):
        AdditiveCoupling(nn.Sequential(nn.ReLU()), 2)
    # with channels given, any F mapping x2 (3 channels) to x1 (2 channels) works
    layer = AdditiveCoupling(nn.Conv1d(3, 2, 1), 2, channels=5)
    x = torch.randn(1, 5, 4)
    torch.testing.assert_close(layer.inverse(layer(x)), x)
    with pytest.raises(ValueError, match="split must be between 1 and channels - 1"):
        AdditiveCoupling(nn.Conv1d(4, 4, 1), 0)


@pytest.mark.parametrize("me_backend", ["fused", "memcnn"])
def test_tutorial2_custom_module_gradients_equal_autograd(me_backend):
    """The docs' user block (an AdditiveCoupling around a plain nn.Sequential) inside an iUNet:
    the memory-efficient gradients equal plain autograd."""
    torch.manual_seed(1)
    model = iunet_nb.iUNet(channels=(8, 16, 32), dim=3, architecture=(1, 2, 1),
                           create_module_fn=my_module_fn, me_backend=me_backend).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    G = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    grads = {}
    for plain in (False, True):
        model.disable_custom_gradient = plain
        model.zero_grad()
        xi = x.clone().requires_grad_()
        (model(xi) * G).sum().backward()
        grads[plain] = [xi.grad] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
